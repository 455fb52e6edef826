/*
 * fastopt.torch's planned step reads each tensor's address, size, dtype and layout at C++ speed.
 *
 * Through Python, each of those reads is one of torch's getters or methods (argument parsing, a
 * new int object, a warning handler): ~1-2 us per parameter on 2-vCPU VMs, most of a planned
 * step on many small tensors.  Here they are field reads of the TensorImpl behind the Python
 * object.  Built against the installed torch's headers at run time (fastopt/native_torch.py,
 * cached per torch build), since an extension compiled for one torch build cannot load in
 * another; the engine finds these functions through the module's capsule (torch_access.h),
 * so fastopt._kernels never links against torch.
 *
 * Every function here is a pure read except bump_versions, never raises and never throws:
 * anything unexpected answers "not viewable", and the caller takes the Python route.
 */
#include <Python.h>

#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include "torch_access.h"

namespace {

int view_of(const at::Tensor &t, fo_tensor_view *out) noexcept
{
    try {
        if (!t.defined())
            return 0;
        c10::TensorImpl *impl = t.unsafeGetTensorImpl();
        // a Python subclass that dispatches (DTensor, FakeTensor) or memory torch has not put
        // on this CPU: the Python route decides what to do with it
        // (a tensor without storage throws at mutable_data() below)
        if (impl->key_set().has(c10::DispatchKey::Python) || impl->layout() != c10::kStrided ||
            !impl->device().is_cpu())
            return -1;
        if (impl->is_conj() || impl->is_neg())
            return -2;
        PyObject *owner = impl->pyobj_slot()->load_pyobj();
        out->plain = owner == nullptr || Py_TYPE(owner) == reinterpret_cast<PyTypeObject *>(THPVariableClass);
        out->contiguous = impl->is_contiguous();
        out->dtype = static_cast<int>(t.scalar_type());
        out->nbytes = static_cast<size_t>(impl->numel()) * impl->itemsize();
        // as Tensor.data_ptr() does: a copy-on-write storage is made the tensor's own first
        out->data = impl->mutable_data();
        return 1;
    } catch (...) {
        return -1;
    }
}

/* t: a torch.Tensor (the caller checked the type). */
int view(PyObject *t, fo_tensor_view *out)
{
    return view_of(THPVariable_Unpack(t), out);
}

/* The gradient held by parameter p (a torch.Tensor or nn.Parameter, whose .grad is torch's own
 * getter): 1 with its view, 0 when p has none, -1 when not viewable, -3 when its shape is not
 * p's (as many elements, or a planned step would have taken it).  Read from p's autograd
 * metadata, as torch's getter reads it, without the getter's non-leaf warning.  With
 * param_out, p's own view too when the gradient's is 1 (-1 if p's is not 1). */
int grad_view(PyObject *p, fo_tensor_view *out, fo_tensor_view *param_out)
{
    try {
        const at::Tensor &param = THPVariable_Unpack(p);
        const at::Tensor &grad = param.unsafeGetTensorImpl()->grad();
        const int found = view_of(grad, out);
        if (found == 1 && !param.unsafeGetTensorImpl()->sizes().equals(grad.unsafeGetTensorImpl()->sizes()))
            return -3;
        if (found == 1 && param_out && view_of(param, param_out) != 1)
            return -1;
        return found;
    } catch (...) {
        return -1;
    }
}

/* A torch.dtype's code, as view() reports it; -1 for anything else. */
int dtype_code(PyObject *dtype)
{
    if (!THPDtype_Check(dtype))
        return -1;
    return static_cast<int>(reinterpret_cast<THPDtype *>(dtype)->scalar_type);
}

/* What torch.autograd.graph.increment_version(tensors) does (their_grads: to their gradients;
 * inference tensors have no version to bump). */
int bump_versions(PyObject *tensors, int their_grads)
{
    const Py_ssize_t n = PyList_GET_SIZE(tensors);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!THPVariable_Check(PyList_GET_ITEM(tensors, i)))
            return -1;
    try {
        for (Py_ssize_t i = 0; i < n; i++) {
            const at::Tensor &item = THPVariable_Unpack(PyList_GET_ITEM(tensors, i));
            const at::Tensor &t = their_grads ? item.unsafeGetTensorImpl()->grad() : item;
            if (t.defined() && !t.is_inference())
                torch::autograd::impl::bump_version(t);
        }
    } catch (...) {
        return -1;
    }
    return 0;
}

const fo_torch_access reads = {FO_TORCH_ACCESS_VERSION, view, grad_view, dtype_code, bump_versions};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastopt_torch_tensors",
                      "fastopt.torch's tensor reads at C++ speed (csrc/torch_tensors.cpp)", -1};

}  // namespace

PyMODINIT_FUNC PyInit__fastopt_torch_tensors(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == nullptr)
        return nullptr;
    PyObject *capsule = PyCapsule_New(const_cast<fo_torch_access *>(&reads), FO_TORCH_ACCESS_NAME, nullptr);
    if (capsule == nullptr || PyModule_AddObject(m, "ACCESS", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
