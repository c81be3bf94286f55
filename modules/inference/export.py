"""TorchScript export of a CTC ConMamba model: waveform -> CTC log-probabilities, any audio length.

The exported graph is what ``train_CTC.py`` computes at test (``modules.models.front_end.WaveformEncoder``):
Fbank -> global normalization -> CNN front-end (exact frame counts) -> speech encoder -> CTC head ->
log-softmax, for a padded batch with relative lengths. It
is made with ``torch.jit.trace`` and needs no package beyond PyTorch to run (``torch.jit.load``).

Tracing unrolls Python loops, and the pure-PyTorch selective scan loops over time, so a plain trace
would only accept the traced length. During the trace the Mamba mixers therefore use the ``"script"``
scan back-end (:func:`modules.mamba.selective_scan.scan_loop`), a TorchScript function whose time
loop stays a loop in the graph: the exported model takes any number of samples. Mamba-1 mixers only
(the Mamba-2 scan is not scripted).

    python -m modules.inference.export results/<run>/inference ctc_model.pt
    model = torch.jit.load("ctc_model.pt"); log_probs = model(wavs, wav_lens)
"""

import argparse
import contextlib

import torch

from modules.inference.folders import load_asr
from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2
from modules.models.front_end import WaveformEncoder


@contextlib.contextmanager
def scripted_scan(model):
    """Makes the Mamba-1 mixers of ``model`` use the TorchScript scan (``scan_backend="script"``) while tracing."""
    mixers = [module for module in model.modules() if isinstance(module, Mamba)]
    backends = [mixer.scan_backend for mixer in mixers]
    for mixer in mixers:
        mixer.scan_backend = "script"
    try:
        yield
    finally:
        for mixer, backend in zip(mixers, backends):
            mixer.scan_backend = backend


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
    with torch.no_grad(), scripted_scan(model):
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
