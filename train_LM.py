#!/usr/bin/env python3
"""Recipe for training the Transformer LM of an encoder-decoder recipe's shallow fusion.

It reads the encoder-decoder yaml itself, so the LM has the architecture (``lm_model``) and the
tokenizer that ``train_S2S.py`` fuses at test: it prepares the same manifests, trains (or reuses) the
same SentencePiece model in the same output folder, trains ``lm_model`` on the training transcripts
(next-token cross-entropy, validation perplexity each epoch) and writes its state dict to
``lm_output_file``. Nothing is downloaded.

> python train_LM.py hparams/S2S/demo_conmamba.yaml
> python train_S2S.py hparams/S2S/demo_conmamba.yaml --lm_file results/demo_conmamba_s2s/7775/lm/lm.ckpt

Authors
 * Mamba-ASR recipes contributors
"""

import logging
import math
import os
import sys

import speechbrain as sb
import torch

from librispeech_prepare import prepare_librispeech
from modules.training.hparams import load_hparams
from modules.training.recipe import csv_name, prepare_manifests, train_tokenizer

logger = logging.getLogger(__name__)

# Every key of the yaml that this recipe reads (tests/test_config_checks.py keeps the list complete).
REQUIRED_HPARAMS = """
    bad_data bos_index character_coverage data_folder dev_splits eos_index lm_batch_size lm_lr lm_model
    lm_number_of_epochs lm_output_file output_folder output_neurons select_n_sentences skip_prep
    test_splits token_type tokenizer_folder train_csv train_splits valid_csv
""".split()


class LM(sb.Brain):
    """Next-token training of ``modules["lm"]`` on token sequences ``<bos> w_1 .. w_n`` -> ``w_1 .. w_n <eos>``."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        return torch.log_softmax(self.modules.lm(tokens_bos), dim=-1)

    def compute_objectives(self, predictions, batch, stage):
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        return sb.nnet.losses.nll_loss(predictions, tokens_eos, length=tokens_eos_lens)

    def on_stage_end(self, stage, stage_loss, epoch):
        if stage == sb.Stage.VALID:
            logger.info(f"LM epoch {epoch}: valid loss {stage_loss:.3f}, perplexity {math.exp(stage_loss):.2f}")


def dataio_prepare(hparams, tokenizer):
    """Train and valid sets of the transcripts, with ``tokens_bos`` and ``tokens_eos``."""

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        tokens = tokenizer.sp.encode_as_ids(wrd)
        yield torch.LongTensor([hparams["bos_index"]] + tokens)
        yield torch.LongTensor(tokens + [hparams["eos_index"]])

    datasets = []
    for path in (hparams["train_csv"], hparams["valid_csv"]):
        data = sb.dataio.dataset.DynamicItemDataset.from_csv(path)
        sb.dataio.dataset.add_dynamic_item([data], text_pipeline)
        sb.dataio.dataset.set_output_keys([data], ["id", "tokens_bos", "tokens_eos"])
        datasets.append(data)
        logger.info(f"LM text: {len(data)} transcripts of {csv_name(path)}")
    return datasets


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    hparams = load_hparams(hparams_file, overrides, REQUIRED_HPARAMS)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"])

    prepare_manifests(hparams, prepare_librispeech)
    tokenizer = train_tokenizer(hparams)  # the encoder-decoder recipe's, reused when already trained
    train_data, valid_data = dataio_prepare(hparams, tokenizer)

    lm = hparams["lm_model"]()
    brain = LM(
        modules={"lm": lm},
        opt_class=lambda params: torch.optim.Adam(params, lr=hparams["lm_lr"]),
        hparams=hparams,
        run_opts=run_opts,
    )
    loader = {"batch_size": hparams["lm_batch_size"], "shuffle": True}
    brain.fit(
        range(1, hparams["lm_number_of_epochs"] + 1),
        train_data,
        valid_data,
        train_loader_kwargs=loader,
        valid_loader_kwargs={"batch_size": hparams["lm_batch_size"]},
    )
    os.makedirs(os.path.dirname(os.path.abspath(hparams["lm_output_file"])), exist_ok=True)
    torch.save(lm.state_dict(), hparams["lm_output_file"])
    print(f"Wrote {hparams['lm_output_file']}: python train_S2S.py {hparams_file} --lm_file {hparams['lm_output_file']}")
