// launch_key(*lists) -> bytes | None
//
// The triton backend's launch-table cache key (onecycle_fused/backends/
// triton.py, _Launcher._launch_table), as one bytes object to hash and
// compare: for each list its length, then for each item its data address,
// a word of dtype, device and the negative / conjugate bits, its number of
// dimensions, its sizes and strides (a None item: one word, -1, never a
// user-space address), so that the bytes parse back one way only. A
// table is reused only for tensors at the same addresses in the same
// layouts and dtypes, since a hit skips the checks its build makes.
//
// Taken in Python such a key costs ~2-4 us a tensor on the project's 2-core
// CPU (an attribute call each, then hashing and comparing nested tuples),
// about half of the triton backend's host time per step over 5,000 tensors;
// on an H100 that eager step was host-bound at ~3x torch's fused one. Here
// it is ~0.1 us a tensor.
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
  try {
    std::vector<int64_t> out;
    for (Py_ssize_t a = 0; a < nargs; ++a) {
      PyObject* seq = args[a];
      if (!PyList_Check(seq) && !PyTuple_Check(seq)) Py_RETURN_NONE;
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
      PyObject** items = PySequence_Fast_ITEMS(seq);
      out.reserve(out.size() + 1 + 6 * n);
      out.push_back(n);
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* obj = items[i];
        if (obj == Py_None) {
          out.push_back(-1);
          continue;
        }
        if (!THPVariable_Check(obj)) Py_RETURN_NONE;
        const at::Tensor& t = THPVariable_Unpack(obj);
        if (t.layout() != at::kStrided || !t.has_storage()) Py_RETURN_NONE;
        const at::Device device = t.device();
        out.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
        out.push_back(static_cast<int64_t>(t.scalar_type()) << 40 | static_cast<int64_t>(device.type()) << 24 |
                      static_cast<int64_t>(device.index() + 1) << 8 | static_cast<int64_t>(t.is_neg()) << 1 |
                      static_cast<int64_t>(t.is_conj()));
        out.push_back(t.dim());
        for (const int64_t s : t.sizes()) out.push_back(s);
        for (const int64_t s : t.strides()) out.push_back(s);
      }
    }
    return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                     static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (const std::exception&) {  // sizes or an address a tensor cannot give
    Py_RETURN_NONE;
  }
}

}  // namespace onecycle_fused
