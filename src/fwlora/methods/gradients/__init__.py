"""The warm-up statistic both adaptive methods measure (FW-LoRA's Fisher scores, fwrank's gradient spectra).

For a LoRA-adapted linear layer y = x W^T, the gradient of the loss with respect to the frozen weight is
G = dL/dW = sum_tokens g x^T (g = dL/dy). A forward hook on each LoRA layer keeps its input x and hangs a
tensor hook on its output y that receives g in the backward pass; the hook folds each micro-batch into a
per-layer accumulator, never touching autograd's weight gradients. Once per optimizer step, `step()`
averages the accumulators over data-parallel processes (as DDP averages gradients) and only then hands
them to the method, so the statistic is that of the global batch the optimizer step sees, however the
batch is split into micro-batches or processes.

What is accumulated per layer (d_in, d_out: the layer's sizes; p: sketch_size; Omega: a Gaussian matrix
drawn afresh each step from (seed, step, size), the same on every process and in a resumed run):
    side "input"    sketch  (G Omega)^T  = (x Omega)^T g     (p, d_out), Omega d_in x p     (FW-LoRA)
                    exact   G                                 (d_out, d_in)
    side "smaller"  the smaller of d_in, d_out is kept: as above where d_out <= d_in, else     (fwrank)
                    sketch  Omega'^T G   = (g Omega')^T x     (p, d_in), Omega' d_out x p
                    exact   G^T where d_out <= d_in, else G
E ||G Omega||_F^2 = p ||G||_F^2 and E[Y^T Y] / p = G G^T for Y = (G Omega)^T: the sketch is unbiased for
the squared norm and the second moment, and linear in G, so it is exact under accumulation and DDP too.
`measure_every = k` measures one warm-up step in k (the methods' EMAs then decay by beta^k per measured
step, so they span the same steps).

The package, by concern: settings.py (WarmupConfig, shared by both methods), layers.py (which layers are
measured), hooks.py (where g and x are caught), statistic.py (accumulation, sketch, steps), distributed.py
(the reduction over processes), state_file.py (saving a method's state). It depends on torch, peft and
fwlora.errors / files / checks only: copy it with one method's folder to have that method in another project.
"""

from fwlora.checks import is_fraction, is_int, is_real
from fwlora.errors import FWLoRAError
from fwlora.methods.gradients.distributed import average_over_processes, same_on_every_process
from fwlora.methods.gradients.hooks import GradientHooks
from fwlora.methods.gradients.layers import find_lora_layers, is_linear, layer_dims, single_active_adapter
from fwlora.methods.gradients.settings import DEFAULT_MEASURE_EVERY, WarmupConfig, check_reachable, matches_saved
from fwlora.methods.gradients.state_file import SavedState, read_state_file, save_state_file
from fwlora.methods.gradients.statistic import GradientStatistic, stat_dtype

__all__ = ["DEFAULT_MEASURE_EVERY", "FWLoRAError", "GradientHooks", "GradientStatistic", "WarmupConfig",
           "average_over_processes", "check_reachable", "find_lora_layers", "is_fraction", "is_int", "is_linear",
           "is_real", "layer_dims", "matches_saved", "read_state_file", "SavedState", "same_on_every_process", "save_state_file",
           "single_active_adapter", "stat_dtype"]
