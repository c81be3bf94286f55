"""TorchScript export of a CTC ConMamba model: waveform -> CTC log-probabilities, any audio length.

The exported graph is what ``train_CTC.py`` computes at test (``modules.front_end.WaveformEncoder``):
Fbank -> global normalization -> CNN front-end (exact frame counts) -> speech encoder -> CTC head ->
log-softmax, for a padded batch with relative lengths. It
is made with ``torch.jit.trace`` and needs no package beyond PyTorch to run (``torch.jit.load``).

Tracing unrolls Python loops, and the pure-PyTorch selective scan loops over time, so a plain trace
would only accept the traced length. During the trace the Mamba mixers therefore call
:func:`scan_loop` instead, a TorchScript function whose time loop stays a loop in the graph: the
exported model takes any number of samples. Mamba-1 mixers only (the Mamba-2 scan is not scripted).

    python -m modules.export results/<run>/inference ctc_model.pt
    model = torch.jit.load("ctc_model.pt"); log_probs = model(wavs, wav_lens)
"""

import argparse
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

import modules.mamba.mamba
from modules.front_end import WaveformEncoder
from modules.inference import load_asr
from modules.mamba.mamba2 import Mamba2


@torch.jit.script
def scan_loop(u, delta, A, B, C, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool):
    """The recurrence of ``selective_scan_ref`` (without z and initial state) in TorchScript, which
    keeps its loop over time a loop; the reference's conditional return type does not script.

    u, delta (batch, dim, time), A (dim, state), B, C (batch, groups, state, time) or (batch, state,
    time). Computes in float32 (float64 stays float64); returns (batch, dim, time) in u's dtype.
    """
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    B, C = B.to(compute), C.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, state = u.shape[0], u.shape[1], A.shape[1]
    groups = B.shape[1]
    decay = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A)  # (time, batch, dim, state)
    delta_u = (delta * u).permute(2, 0, 1).reshape(-1, batch, groups, dim // groups, 1)
    states = (delta_u * B.permute(3, 0, 1, 2).unsqueeze(3)).reshape(-1, batch, dim, state)
    h = torch.zeros(batch, dim, state, dtype=u.dtype, device=u.device)
    for t in range(states.shape[0]):  # the inputs delta*B*u become the states, in place
        h = states[t].addcmul_(decay[t], h)
    C_t = C.permute(3, 0, 1, 2).unsqueeze(-1)  # (time, batch, groups, state, 1)
    y = torch.matmul(states.view(-1, batch, groups, dim // groups, state), C_t).view(-1, batch, dim).permute(1, 2, 0)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    return y.to(dtype)


def _traceable_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                    return_last_state=False):
    """:func:`modules.mamba.selective_scan.selective_scan` as the whole-sequence mixers call it."""
    if z is not None or initial_state is not None or return_last_state:
        raise NotImplementedError("export covers the whole-sequence Mamba-1 forward (no z, no cache)")
    return scan_loop(u, delta, A, B, C, D, delta_bias, delta_softplus)


@contextlib.contextmanager
def scripted_scan():
    """Makes the Mamba-1 mixers call :func:`scan_loop` while tracing."""
    original = modules.mamba.mamba.selective_scan
    modules.mamba.mamba.selective_scan = _traceable_scan
    try:
        yield
    finally:
        modules.mamba.mamba.selective_scan = original


def export_ctc(hparams, example_samples=16000):
    """TorchScript module of the CTC model in ``hparams`` (a mapping with the yaml's keys
    compute_features, normalize, CNN, speech_encoder, ctc_lin), traced on ``example_samples`` of audio
    but taking any batch size and length."""
    keys = ("compute_features", "normalize", "CNN", "speech_encoder", "ctc_lin")
    model = WaveformEncoder(*(hparams[key] for key in keys))
    model.eval()
    if any(isinstance(module, Mamba2) for module in model.modules()):
        raise NotImplementedError("export supports Mamba-1 mixers only: the Mamba-2 scan would be traced at one length")
    device = hparams["ctc_lin"].w.weight.device
    # A padded batch, so that neither the batch size nor full lengths become constants of the trace
    example = (torch.randn(2, example_samples, device=device), torch.tensor([1.0, 0.75], device=device))
    with torch.no_grad(), scripted_scan():
        return torch.jit.trace(model, example, check_trace=False)


def main():
    parser = argparse.ArgumentParser(description="Exports a trained CTC model (an inference folder) to TorchScript.")
    parser.add_argument("inference_folder", help="<output_folder>/inference of a train_CTC.py run")
    parser.add_argument("output", help="the TorchScript file to write, e.g. ctc_model.pt")
    args = parser.parse_args()
    exported = export_ctc(vars(load_asr(args.inference_folder).hparams))
    exported.save(args.output)
    print(f"Wrote {args.output}: torch.jit.load it and call it with (wavs, wav_lens) -> CTC log-probabilities")


if __name__ == "__main__":
    main()
