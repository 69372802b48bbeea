// The one schema table of the rlengine operator library.
//
// Every op is defined here once; each device backend registers its kernels with
// TORCH_LIBRARY_IMPL(rlengine, <key>, m) in csrc/<device>/<family>.cpp, and rlengine/ops/
// registers the fake (meta) kernels and autograd formulas in Python. `rlengine/ops/reference.py`
// says in plain PyTorch what each forward op computes. Schemas carry no default values: the
// typed wrappers in rlengine/ops/ own the defaults (and the fake kernels then always receive
// every argument).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rlengine, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};

  // ---- log-probs (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cpp) ---------------------------
  // logprobs and entropy are fp32 (fp64 for fp64 logits) with the shape of labels; entropy is
  // empty unless with_entropy; logsumexp of logits / temperature is kept for the backward.
  // inplace_backward does not change the forward: it tells the autograd formula to call
  // token_logprobs_inplace_backward. It is the one schema default, so that callers written
  // for the five-argument op keep working.
  m.def("token_logprobs(Tensor logits, Tensor labels, float temperature, "
        "int ignore_index, bool with_entropy, bool inplace_backward=False) "
        "-> (Tensor logprobs, Tensor entropy, Tensor logsumexp)", tags);
  m.def("token_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, "
        "Tensor labels, Tensor logsumexp, Tensor entropy, float temperature, int ignore_index) "
        "-> Tensor", tags);
  // The same gradient written over the logits (through their strides): no N x V allocation.
  m.def("token_logprobs_inplace_backward(Tensor? grad_logprobs, Tensor? grad_entropy, "
        "Tensor(a!) logits, Tensor labels, Tensor logsumexp, Tensor entropy, float temperature, "
        "int ignore_index) -> ()", tags);

  // ---- ranking and preference losses (csrc/cpu/ranking.cpp) ----------------------------------
  m.def("sequence_scores(Tensor token_logprobs, Tensor mask, float length_penalty) -> Tensor",
        tags);
  m.def("sequence_scores_backward(Tensor grad_scores, Tensor mask, float length_penalty, "
        "ScalarType dtype) -> Tensor", tags);
  m.def("rrhf_rank_loss(Tensor scores, Tensor rewards, Tensor? valid) -> Tensor", tags);
  m.def("rrhf_rank_loss_backward(Tensor grad_loss, Tensor scores, Tensor rewards, "
        "Tensor? valid) -> Tensor", tags);
  m.def("bt_loss(Tensor chosen, Tensor rejected, Tensor? margin, "
        "Tensor? label_smoothing, float margin_value, "
        "float label_smoothing_value) -> Tensor", tags);
  // grad_delta is dloss/d(chosen - rejected - margin) times grad_loss; the Python autograd
  // formula turns it into the gradients of chosen, rejected and margin.
  m.def("bt_loss_backward(Tensor grad_loss, Tensor chosen, Tensor rejected, Tensor? margin, "
        "Tensor? label_smoothing, float margin_value, float label_smoothing_value) "
        "-> (Tensor grad_delta, Tensor grad_label_smoothing)", tags);

  // ---- advantages and returns (csrc/cpu/gae.cpp) ---------------------------------------------
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, Tensor? last_values, float gamma, "
        "float lam) -> (Tensor advantages, Tensor returns)", tags);
  m.def("gae_backward(Tensor? grad_advantages, Tensor? grad_returns, Tensor mask, float gamma, "
        "float lam) -> (Tensor grad_rewards, Tensor grad_values, Tensor grad_last_values)", tags);
  m.def("discounted_returns(Tensor rewards, Tensor mask, Tensor? last_values, float gamma) "
        "-> Tensor", tags);
  m.def("discounted_returns_backward(Tensor grad_returns, Tensor mask, float gamma) "
        "-> (Tensor grad_rewards, Tensor grad_last_values)", tags);

  // ---- segment rewards (csrc/cpu/segments.cpp) -----------------------------------------------
  m.def("entropy_segments(Tensor entropy, Tensor response_mask, float threshold) "
        "-> (Tensor segment_ids, Tensor counts)", tags);
  m.def("segment_reduce(Tensor values, Tensor segment_ids, Tensor counts, str reduce) -> Tensor",
        tags);
  m.def("segment_reduce_backward(Tensor grad, Tensor segment_ids, Tensor counts, str reduce, "
        "ScalarType dtype) -> Tensor", tags);
  m.def("segment_rewards_to_dense(Tensor segment_rewards, Tensor segment_ids, Tensor counts, "
        "Tensor mask, float[]? normalizer, str spread, float clamp) -> Tensor", tags);
  m.def("segment_rewards_to_dense_backward(Tensor grad_rewards, Tensor segment_rewards, "
        "Tensor segment_ids, Tensor counts, Tensor mask, float[]? normalizer, str spread, "
        "float clamp) -> Tensor", tags);

  // ---- masked statistics (csrc/cpu/stats.cpp) ------------------------------------------------
  m.def("masked_mean(Tensor x, Tensor mask, int? dim) -> Tensor", tags);
  m.def("masked_mean_backward(Tensor grad, Tensor mask, int? dim, ScalarType dtype) -> Tensor",
        tags);
  m.def("masked_var(Tensor x, Tensor mask, int? dim, bool unbiased) -> Tensor", tags);
  m.def("masked_var_backward(Tensor grad, Tensor x, Tensor mask, int? dim, bool unbiased) "
        "-> Tensor", tags);
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) "
        "-> Tensor", tags);
  m.def("masked_whiten_backward(Tensor grad, Tensor x, Tensor mask, bool shift_mean, "
        "bool unbiased, float eps) -> Tensor", tags);
}

// rlengine._C is imported as a Python module so that `import rlengine` loads (and thereby
// registers) the kernels; it defines no Python functions of its own.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "rlengine's compiled kernels (registered as torch.ops.rlengine)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
