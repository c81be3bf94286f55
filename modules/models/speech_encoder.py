"""Speech encoder wrapper shared by the CTC recipes.

It projects the convolutional front-end features to the encoder width, adds an
optional positional embedding and runs an encoder stack (Conformer, ConMamba,
...) with a padding mask built from SpeechBrain's relative lengths. Because
every encoder is called the same way, swapping encoders is a yaml change.

Authors
 * Mamba-ASR recipes contributors
"""

import torch

from modules.models.initialization import xavier_normal_matrices


class SpeechEncoder(torch.nn.Module):
    """Input projection + optional positional embedding + encoder stack.

    Arguments
    ---------
    input_size : int
        Feature size after flattening the front-end output (e.g. 32 * 20 = 640).
    d_model : int
        Width of the encoder.
    encoder : torch.nn.Module
        Encoder stack called as ``encoder(x, src_key_padding_mask=..., pos_embs=...)``
        and returning ``(output, attention_or_None)``, like SpeechBrain's
        ``ConformerEncoder``.
    positional_encoding : torch.nn.Module, optional
        Module producing positional embeddings from the projected input
        (e.g. ``RelPosEncXL`` for ``RelPosMHAXL`` attention). None for
        encoders that need no positional information (ConMamba).
    dropout : float
        Dropout applied after the input projection.
    xavier_init : bool
        Re-initialises the input projection and the encoder xavier-normal, Mamba mixers excepted
        (:func:`modules.models.initialization.xavier_normal_matrices`), as the published CTC models are.
        The encoder-decoder recipes leave it off: ``Seq2SeqModel`` applies the rule to the
        whole model.

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
    >>> from speechbrain.nnet.attention import RelPosEncXL
    >>> enc = SpeechEncoder(
    ...     input_size=40, d_model=16,
    ...     encoder=ConformerEncoder(num_layers=1, d_model=16, d_ffn=32, nhead=2),
    ...     positional_encoding=RelPosEncXL(16),
    ... )
    >>> out = enc(torch.rand(2, 10, 4, 10), torch.tensor([1.0, 0.5]))
    >>> out.shape
    torch.Size([2, 10, 16])
    """

    def __init__(
        self, input_size, d_model, encoder, positional_encoding=None, dropout=0.1, xavier_init=False
    ):
        super().__init__()
        self.input_projection = torch.nn.Sequential(
            torch.nn.Linear(input_size, d_model), torch.nn.Dropout(dropout)
        )
        self.positional_encoding = positional_encoding
        self.encoder = encoder
        if xavier_init:
            xavier_normal_matrices(self)

    def forward(self, x, wav_lens):
        """Encodes a padded batch.

        Arguments
        ---------
        x : torch.Tensor
            Front-end features, (B, T, C) or (B, T, C1, C2).
        wav_lens : torch.Tensor
            Relative lengths (B,) of the utterances, in [0, 1].

        Returns
        -------
        torch.Tensor
            Encoded sequence (B, T, d_model).
        """
        if x.dim() == 4:
            x = x.flatten(start_dim=2)
        # True at padded frames, as expected by src_key_padding_mask. (Not SpeechBrain's length_to_mask:
        # its len() would freeze the batch size of a traced model, see modules/inference/export.py.)
        abs_lens = torch.round(wav_lens * x.shape[1])
        padding_mask = torch.arange(x.shape[1], device=x.device) >= abs_lens[:, None]
        return self.encode(x, padding_mask)

    def encode(self, x, padding_mask):
        """Input projection, positional embedding and encoder stack over x (B, T, C), padding_mask
        (B, T) True at padded frames: all that :func:`modules.training.cuda_graphs.use_cuda_graphs`
        records as one graph."""
        x = self.input_projection(x)
        pos_embs = None
        if self.positional_encoding is not None:
            pos_embs = self.positional_encoding(x)
        return self.encoder(x, src_key_padding_mask=padding_mask, pos_embs=pos_embs)[0]
