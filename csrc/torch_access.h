/* What fastopt.torch's C++ reader (torch_tensors.cpp) hands the engine, through the capsule
 * named FO_TORCH_ACCESS_NAME: reads of torch tensors without Python calls.  Internal: not part
 * of fastopt.h's API. */
#ifndef FASTOPT_TORCH_ACCESS_H
#define FASTOPT_TORCH_ACCESS_H

#include <Python.h>
#include <stddef.h>

#define FO_TORCH_ACCESS_NAME "fastopt.torch_access"
#define FO_TORCH_ACCESS_VERSION 2 /* 2: grad_view's -3 */

typedef struct {
    void *data;     /* Tensor.data_ptr() */
    size_t nbytes;  /* Tensor.nbytes */
    int dtype;      /* the dtype's code (dtype_code of its torch.dtype) */
    int contiguous; /* Tensor.is_contiguous() */
    int plain;      /* its Python object, if it has one, is exactly a torch.Tensor */
} fo_tensor_view;

typedef struct {
    int version; /* FO_TORCH_ACCESS_VERSION */
    /* 1 and *out filled for a dense CPU tensor; 0 for an undefined one; -1 for one only the
     * Python route can read (sparse, another device, a dispatching subclass); -2 for a lazily
     * conjugated or negated view, whose memory holds other values than it shows: never raises */
    int (*view)(PyObject *tensor, fo_tensor_view *out);
    /* param's .grad (and, with param_out, param itself, where its gradient answers 1); -3 for
     * a gradient whose shape is not param's */
    int (*grad_view)(PyObject *param, fo_tensor_view *out, fo_tensor_view *param_out);
    int (*dtype_code)(PyObject *dtype);
    /* torch.autograd.graph.increment_version of a list of tensors (their_grads: of their
     * gradients): 0, or -1 when an item is not a tensor (nothing bumped) or torch threw (some
     * may be: bumping again is harmless) */
    int (*bump_versions)(PyObject *tensor_list, int their_grads);
} fo_torch_access;

#endif
