/* A stand-in for the NVIDIA driver library (libcuda.so.1) on machines without one.
 *
 * SGLang's CUDA-built kernel package links against libcuda.so.1, so it cannot even be imported where no NVIDIA
 * driver is installed (CPU-only CI). This library lets the import succeed; every driver call it implements answers
 * CUDA_ERROR_NO_DEVICE (100), so nothing can mistake the machine for one with a GPU. Build:
 *   gcc -shared -fPIC -o libcuda.so.1 libcuda_stub.c
 * and put its directory on LD_LIBRARY_PATH (scripts/ci/setup_sglang_env.sh does both). Never install it on a
 * machine that has a real driver. */
#define NO_DEVICE 100

#define STUB(name) \
    int name() { return NO_DEVICE; }

STUB(cuInit)
STUB(cuDriverGetVersion)
STUB(cuDeviceGet)
STUB(cuDeviceGetCount)
STUB(cuDeviceGetName)
STUB(cuDeviceGetAttribute)
STUB(cuDeviceTotalMem_v2)
STUB(cuCtxGetCurrent)
STUB(cuCtxSetCurrent)
STUB(cuCtxGetDevice)
STUB(cuDevicePrimaryCtxRetain)
STUB(cuPointerGetAttribute)
STUB(cuPointerGetAttributes)
STUB(cuGetProcAddress)
STUB(cuGetProcAddress_v2)
STUB(cuGetErrorString)
STUB(cuGetErrorName)
STUB(cuModuleLoadData)
STUB(cuModuleGetFunction)
STUB(cuLaunchKernel)
STUB(cuMemGetInfo_v2)
