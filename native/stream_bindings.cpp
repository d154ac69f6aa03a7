#include <nanobind/nanobind.h>
void bind_stream(nanobind::module_&) {}
