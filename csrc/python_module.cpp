// The Python module bgpo._C.  It holds no Python functions: importing it loads the shared library, whose
// static initialisers register the bgpo_C operators with the PyTorch dispatcher (torch.ops.bgpo_C.*).
// Plain CPython API, no pybind11: it keeps the build small.  Import torch before this module.
#include <Python.h>

namespace {

PyModuleDef bgpo_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                            // m_name
    "bgpo's C++/CUDA kernels, registered as torch.ops.bgpo_C.*",     // m_doc
    -1,                                                              // m_size
    nullptr,                                                         // m_methods
    nullptr,                                                         // m_slots
    nullptr,                                                         // m_traverse
    nullptr,                                                         // m_clear
    nullptr,                                                         // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&bgpo_c_module); }
