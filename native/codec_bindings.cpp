#include <nanobind/nanobind.h>
void bind_codec(nanobind::module_&) {}
