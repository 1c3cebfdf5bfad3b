"""The ncnn layer: what ncnn reads, writes and runs, with numpy and ncnn only (never torch).

- :mod:`.param`, :mod:`.bin_layout`, :mod:`.model_writer`: the ``.param`` / ``.bin`` formats as
  ncnn's ``ParamDict`` / ``ModelBin`` read them and ncnn's ``ModelWriter`` writes them;
- :mod:`.table`: the calibration table format ncnn2table writes and ncnn2int8 reads;
- :mod:`lightning_ncnnqat.ncnn.int8_writer`: the int8 model ncnn2int8 writes, from a float model and a table;
- :mod:`.worker`, :mod:`.speed_worker`: child-process scripts that run ncnn (standard library,
  numpy and ncnn only, so they also run on the emulated ARM targets); :mod:`.isolated` starts
  them and reads their results; :mod:`.runtime` runs ncnn in this process (tests, benchmarks);
- :mod:`.targets`: the emulated ARM64 targets (qemu + the aarch64 ncnn wheel).

Calibration, the export and the target tools all use this layer; it uses none of them.
"""
