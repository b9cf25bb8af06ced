# Sourced by setup.sh and test.sh: export CUDA_HOME, the toolkit root of the nvcc on the PATH, if unset.
# torch otherwise guesses it wrong and the link fails on -lcudart: dirname(dirname(nvcc)) is wrong when
# nvcc on the PATH is a wrapper script (here /usr/local/bin/nvcc belongs to /usr/local/cuda-13.0), so
# build_ext_config.find_cuda_home asks nvcc itself.
if command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(python3 -c 'import build_ext_config as b; print(b.find_cuda_home() or "")')
  if [ -z "$CUDA_HOME" ]; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); fi
  export CUDA_HOME
fi
