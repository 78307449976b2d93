// The Python entry point of pyobc._C. It creates an empty module: importing it loads this shared
// library, whose static STABLE_TORCH_LIBRARY / STABLE_TORCH_LIBRARY_IMPL objects register the
// operators with torch's dispatcher (torch.ops.pyobc.*). This is the only file that includes
// Python.h; it uses the limited API only, so one binary serves every CPython >= 3.10 (abi3).
#include <Python.h>

static struct PyModuleDef pyobc_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "pyobc compiled operators; importing this module registers torch.ops.pyobc.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyobc_c_module); }
