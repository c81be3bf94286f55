"""Weight initialisation shared by the recipes' models.

SpeechBrain's ``TransformerASR`` re-initialises every parameter with more than one dimension
xavier-normal (``_init_params``). The published ConMamba and Conformer models, CTC and encoder-decoder
alike, go through that class (Speech Slytherin, arXiv 2407.09732; code released with the paper), so
their encoders, input projections and decoders start from xavier-normal weights, not from PyTorch's
defaults. :func:`xavier_normal_matrices` applies the same rule; ``SpeechEncoder`` (CTC recipes) and
``Seq2SeqModel`` (encoder-decoder recipes) call it, switched by their ``xavier_init`` argument.
"""

from torch import nn

from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2


def xavier_normal_matrices(module):
    """Re-initialises xavier-normal every parameter of ``module`` with more than one dimension
    (linear and convolution weights, embeddings, attention biases), except inside Mamba mixers.

    The mixers keep Mamba's own initialisation (S4D-real ``A_log``, ``dt`` bias from the chosen
    step range); the published recipe overwrote them too, a quirk kept as
    ``ConMambaEncoder(xavier_init=True)``. Vectors (biases, norms) keep their initialisation.

    Example
    -------
    >>> layer = nn.Sequential(nn.Linear(256, 1024), Mamba(d_model=16))
    >>> a_log = layer[1].A_log.detach().clone()
    >>> xavier_normal_matrices(layer)
    >>> round(layer[0].weight.std().item(), 2)  # sqrt(2 / (256 + 1024))
    0.04
    >>> bool((layer[1].A_log == a_log).all())
    True
    """
    mixers = [m for m in module.modules() if isinstance(m, (Mamba, Mamba2))]
    kept = {id(p) for mixer in mixers for p in mixer.parameters()}
    for parameter in module.parameters():
        if parameter.dim() > 1 and id(parameter) not in kept:
            nn.init.xavier_normal_(parameter)
