"""The QAT core: settings, the plan, the traced graph, BN folding, the QAT modules, the surgery
that applies a plan, input ranges, and the ONE start sequence (:func:`.start.start_qat`) that
``QATCallback`` and :func:`prepare_qat` both run.

Reading order: :mod:`.config` (``QATConfig``) -> :mod:`.graph` (data flow of one forward) ->
:mod:`.plan` (``QATPlan``, plain data) -> :mod:`.bn_fold` / :mod:`.modules` -> :mod:`.prepare`
(decide and apply a plan) / :mod:`.prepared` (read a prepared model) -> :mod:`.ranges` ->
:mod:`.start`. Around them: :mod:`.batches` (how a model is called), :mod:`.wrappers`,
:mod:`.model_forms`, :mod:`.dtypes`, :mod:`.computed_weights`, :mod:`.model_copies`,
:mod:`.plan_state` and :mod:`.checkpoint` (the plan inside checkpoints).
"""
