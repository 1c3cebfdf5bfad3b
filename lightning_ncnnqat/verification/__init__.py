"""Measurements of an exported model in ncnn against PyTorch: whole-model runs
(:mod:`lightning_ncnnqat.verification.runtime_checks`), per-layer checks
(:mod:`lightning_ncnnqat.verification.layer_checks`), agreement (:mod:`.parity`), the float32 floor
(:mod:`lightning_ncnnqat.verification.output_floor`), the float conversion on its own
(:mod:`.float_conversion`). The rules that judge them are :mod:`lightning_ncnnqat.policy`'s and
return findings; :mod:`.judging` applies them to this machine's figures; :mod:`.verdicts` renders
findings into the report's notes and warnings; :mod:`.report` is the report itself."""
