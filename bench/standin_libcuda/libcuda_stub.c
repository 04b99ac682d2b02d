/* A libcuda.so.1 that answers every driver call Triton's launcher makes
   with success and does nothing: the launcher's own work (argument parsing,
   the call) runs for real, no GPU needed. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef unsigned long long CUdeviceptr;
static int ctx_token;
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub"; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuDeviceGet(CUdevice *d, int o) { *d = o; return 0; }
CUresult cuDeviceGetAttribute(int *v, int a, CUdevice d) { *v = 1; return 0; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = &ctx_token; return 0; }
CUresult cuCtxSetCurrent(CUcontext c) { return 0; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = &ctx_token; return 0; }
CUresult cuCtxGetLimit(size_t *v, int l) { *v = 0; return 0; }
CUresult cuCtxSetLimit(int l, size_t v) { return 0; }
CUresult cuModuleLoadData(CUmodule *m, const void *d) { *m = &ctx_token; return 0; }
CUresult cuModuleUnload(CUmodule m) { return 0; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return 0; }
CUresult cuStreamIsCapturing(void *stream, int *status) { *status = 0; return 0; }  /* not capturing */
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *n) { *f = &ctx_token; return 0; }
CUresult cuFuncGetAttribute(int *v, int a, CUfunction f) { *v = 0; return 0; }
CUresult cuFuncSetAttribute(CUfunction f, int a, int v) { return 0; }
CUresult cuFuncSetCacheConfig(CUfunction f, int c) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const void *c) { *n = 1; return 0; }
CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr) {
  memcpy(data, &ptr, sizeof ptr);  /* CU_POINTER_ATTRIBUTE_DEVICE_POINTER: the pointer itself */
  return 0;
}
CUresult cuTensorMapEncodeTiled() { return 0; }
CUresult cuTensorMapEncodeIm2col() { return 0; }
/* launches made: the stand-in's check that Triton's C launcher ran */
unsigned long long tritonbn_stub_launches;
CUresult cuLaunchKernelEx(const void *config, CUfunction f, void **params, void **extra) {
  ++tritonbn_stub_launches;
  return 0;
}
