// The single extension module peerlearn._native. Each part registers its own
// bindings so the codec and stream layers stay independent translation units.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_codec(nb::module_& m);
void bind_stream(nb::module_& m);

NB_MODULE(_native, m) {
  m.doc() = "peerlearn native data plane: quantized packing, hashing, striped TCP streams";
  bind_codec(m);
  bind_stream(m);
}
