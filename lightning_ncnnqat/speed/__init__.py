"""Int8 that pays: timing int8 against float in ncnn (:mod:`.plan`) and activations ncnn can
chain through requantize (:mod:`.activation_swap`). See docs/speed.md."""
