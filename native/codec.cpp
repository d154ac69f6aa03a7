// placeholder until the codec kernels land
