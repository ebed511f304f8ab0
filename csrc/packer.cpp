// placeholder, replaced by the packing core
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_packer, m) { m.doc() = "soulchat packing core"; }
