"""Examples; a package so tests can `from examples import cifar10`."""
