// launch_key(*lists) -> bytes | None
//
// The triton backend's launch-table cache key (onecycle_fused/backends/
// triton.py, _Launcher._launch_table), as one bytes object to hash and
// compare: for each list its length, then for each item its data address,
// dtype, device, dimensions, sizes and strides (a None item: one word, -1, never a
// user-space address), so that the bytes parse back one way only. A
// table is reused only for tensors at the same addresses in the same
// layouts and dtypes, since a hit skips the checks its build makes.
//
// Taken in Python the same key costs ~0.3-0.4 us a tensor (one call per
// attribute) plus hashing and comparing nested tuples: on an H100 the triton
// backend's eager step over 5,000 tensors spent more host time on its key
// than torch's fused step took in all. Here it is a few tens of ns a tensor.
//
// None when an item is neither a tensor nor None, or a tensor has no data
// address to read (no storage, sparse): the caller then takes the key in
// Python, which raises where it must.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace onecycle_fused {

PyObject* launch_key(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  std::vector<int64_t> out;
  for (Py_ssize_t a = 0; a < nargs; ++a) {
    PyObject* seq = args[a];
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) Py_RETURN_NONE;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    out.reserve(out.size() + 1 + 5 * n);
    out.push_back(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = items[i];
      if (obj == Py_None) {
        out.push_back(-1);
        continue;
      }
      if (!THPVariable_Check(obj)) Py_RETURN_NONE;
      try {
        const at::Tensor& t = THPVariable_Unpack(obj);
        if (t.layout() != at::kStrided || !t.has_storage()) Py_RETURN_NONE;
        const int64_t dim = t.dim();
        out.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
        const at::Device device = t.device();
        out.push_back(static_cast<int64_t>(t.scalar_type()) << 40 | static_cast<int64_t>(device.type()) << 24 |
                      static_cast<int64_t>(device.index() + 1) << 8 | dim);
        for (const int64_t s : t.sizes()) out.push_back(s);
        for (const int64_t s : t.strides()) out.push_back(s);
      } catch (const std::exception&) {  // sizes or an address it cannot give
        Py_RETURN_NONE;
      }
    }
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

}  // namespace onecycle_fused
