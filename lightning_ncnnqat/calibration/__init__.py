"""ncnn's post-training calibration (ncnn2table: KL, ACIQ, EQ) in PyTorch.

    result = calibrate(model, loader, method="kl", num_batches=20)
    result.write_ncnn_table("ptq.table", "model.ncnn.param", "model.ncnn.bin")
"""

from lightning_ncnnqat.calibration.api import CalibrationResult, LayerCalibration, calibrate

__all__ = ["CalibrationResult", "LayerCalibration", "calibrate"]
