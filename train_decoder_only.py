#!/usr/bin/env python3
"""Recipe for training a decoder-only speech recognizer over discrete speech tokens (MADEON).

The pipeline is: waveform -> discrete speech units (SSL or filterbank features -> k-means ->
de-duplication; computed once and cached, for the training set at each speed of speed perturbation)
-> one joint SentencePiece sequence ``<startofspeech> units <generatetext> text`` -> language model
(Mamba / Mamba-2, with or without speech prefixing, or a Transformer) -> cross-entropy on the text
tokens and the end token.
Validation reports the text-token accuracy; the best checkpoints by accuracy are averaged and the
test sets are decoded by a batched beam search primed with the speech prefix (MADEON, arXiv 2411.06968).
The model is chosen in the yaml file only.

To run on LibriSpeech:
> python train_decoder_only.py hparams/decoder_only/mamba2_parallel.yaml --data_folder /path/to/LibriSpeech

To run the small demo shipped with the repository (CPU, a few minutes):
> python train_decoder_only.py hparams/decoder_only/demo_mamba.yaml

Authors
 * Mamba-ASR recipes contributors
"""

import os
import sys

import torch
import torch.nn.functional as F

import speechbrain as sb
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.utils.distributed import run_on_main

from librispeech_prepare import prepare_librispeech
from modules.inference.folders import export_inference_folder
from modules.training.hparams import load_hparams
from modules.training.recipe import (
    RecipeBrain,
    csv_name,
    evaluate_test_sets,
    load_datasets,
    loader_options,
    lock_output_folder,
    prepare_manifests,
)
from modules.units.manifests import SPEED_PERTURBED_TRAIN, TRAIN
from modules.units.tokens import GENERATE_TEXT, sequence_text, train_joint_sentencepiece

IGNORE_INDEX = -100  # targets that are not scored: speech units and the prefix

# Every key of the yaml that this recipe reads: checked before any work is done
# (tests/test_config_checks.py keeps the list complete).
REQUIRED_HPARAMS = """
    avg_checkpoints bad_data checkpointer data_folder dev_splits dynamic_batch_sampler_train
    dynamic_batch_sampler_valid dynamic_batching eos_index epoch_counter error_rate_computer
    generate_text_index label_smoothing max_duration model model_opt_class modules
    noam_annealing num_workers output_folder select_n_sentences skip_prep sorting
    speech_tokenizer test_csv test_dataloader_opts test_search test_splits text_repeats
    token_folder train_csv train_dataloader_opts train_logger train_splits valid_csv
    valid_dataloader_opts vocab_size
""".split()


class DecoderOnlyASR(RecipeBrain):
    """Teacher-forced training on text tokens, accuracy at validation, beam search at test."""

    best_key = {"max_key": "ACC"}

    def compute_forward(self, batch, stage):
        """Token sequences -> logits (B, L, vocab)."""
        batch = batch.to(self.device)
        tokens, _ = batch.tokens
        return self.modules.lm(tokens)

    def compute_objectives(self, logits, batch, stage):
        """Label-smoothed cross-entropy on the text and end tokens, summed and divided by the batch
        size, as in MADEON; accuracy of those tokens; at test, decodes and updates the WER."""
        targets, target_lens = batch.targets
        padding = ~length_to_mask(target_lens * targets.shape[1], targets.shape[1]).bool()
        targets = targets.masked_fill(padding, IGNORE_INDEX)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        ) / targets.shape[0]

        if stage != sb.Stage.TRAIN:
            scored = targets != IGNORE_INDEX
            self.correct += (logits.argmax(-1) == targets)[scored].sum().item()
            self.scored += scored.sum().item()
        if stage == sb.Stage.TEST:
            prefix, prefix_lens = batch.prefix
            lengths = (prefix_lens * prefix.shape[1]).round().long()
            hyps, _ = self.test_search(prefix, lengths)
            predicted_words = [self.tokenizer.sp.decode_ids(hyp).split() for hyp in hyps]
            target_words = [words.split() for words in batch.words]
            self.wer_metric.append(batch.id, predicted_words, target_words)
        return loss

    def on_stage_start(self, stage, epoch):
        """Fresh accuracy counters and WER tracker."""
        if stage != sb.Stage.TRAIN:
            self.correct = self.scored = 0
            self.wer_metric = self.hparams.error_rate_computer()

    def evaluation_stats(self, stage):
        """Accuracy of the text and end tokens; at test also the WER."""
        stage_stats = {"ACC": self.correct / max(self.scored, 1)}
        if stage == sb.Stage.TEST:
            stage_stats["WER"] = self.wer_metric.summarize("error_rate")
        return stage_stats


def dataio_prepare(hparams, tokenizer, unit_csvs):
    """Builds the datasets over the unit manifests.

    Each item gives ``tokens`` [<startofspeech>, units, <generatetext>, text], ``targets`` (tokens
    shifted left with the end token appended, IGNORE_INDEX up to and including <generatetext>),
    ``prefix`` (the tokens before <generatetext>, the decoding prompt) and the lower-cased ``words``.
    """
    generate_text = tokenizer.sp.piece_to_id(GENERATE_TEXT)

    def encode(units, wrd):
        return tokenizer.sp.encode_as_ids(sequence_text(units, wrd.lower()))

    train_data, valid_data, test_datasets = load_datasets(
        hparams,
        unit_csvs[SPEED_PERTURBED_TRAIN],
        unit_csvs["valid"],
        {name: unit_csvs[name] for name in map(csv_name, hparams["test_csv"])},
    )
    datasets = [train_data, valid_data] + list(test_datasets.values())

    @sb.utils.data_pipeline.takes("units", "wrd")
    @sb.utils.data_pipeline.provides("words", "tokens", "targets", "prefix")
    def token_pipeline(units, wrd):
        yield wrd.lower()
        tokens = encode(units, wrd)
        start = tokens.index(generate_text)
        yield torch.LongTensor(tokens)
        yield torch.LongTensor(
            [IGNORE_INDEX] * start + tokens[start + 1 :] + [hparams["eos_index"]]
        )
        yield torch.LongTensor(tokens[:start])

    sb.dataio.dataset.add_dynamic_item(datasets, token_pipeline)
    sb.dataio.dataset.set_output_keys(
        datasets, ["id", "words", "tokens", "targets", "prefix"]
    )

    return train_data, valid_data, test_datasets, encode  # encode() also sizes dynamic batches


def prepare_tokens(hparams):
    """Speech units of the manifests and the joint SentencePiece model, each made once and then found
    on disk. Returns the unit manifests (split name -> csv) and the tokenizer.

    The k-means and the SentencePiece model see the training set as recorded; the LM trains on its
    speed-perturbed copies, as MADEON's recipe does.
    """
    manifests = {"valid": hparams["valid_csv"]}
    manifests.update({csv_name(path): path for path in hparams["test_csv"]})
    unit_csvs = hparams["speech_tokenizer"](
        hparams["train_csv"], manifests, hparams["token_folder"]
    )
    sentencepiece_folder = os.path.join(
        os.path.dirname(unit_csvs[TRAIN]),
        f"sentencepiece_{hparams['vocab_size']}_x{hparams['text_repeats']}",
    )
    tokenizer = train_joint_sentencepiece(
        unit_csvs[TRAIN],
        sentencepiece_folder,
        hparams["vocab_size"],
        text_repeats=hparams["text_repeats"],
        eos_index=hparams["eos_index"],
    )
    return unit_csvs, tokenizer


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])

    # Initialize ddp (useful only for multi-GPU DDP training)
    sb.utils.distributed.ddp_init_group(run_opts)

    hparams = load_hparams(hparams_file, overrides, REQUIRED_HPARAMS)
    lock_output_folder(hparams["output_folder"])  # one run per output folder

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )

    # Manifests, speech units and the tokenizer are made on the main process; all find them on disk.
    prepare_manifests(hparams, prepare_librispeech)
    run_on_main(prepare_tokens, kwargs={"hparams": hparams})
    unit_csvs, tokenizer = prepare_tokens(hparams)
    if tokenizer.sp.piece_to_id(GENERATE_TEXT) != hparams["generate_text_index"]:
        raise ValueError("generate_text_index does not match the tokenizer's <generatetext>")

    train_data, valid_data, test_datasets, encode = dataio_prepare(hparams, tokenizer, unit_csvs)

    asr_brain = DecoderOnlyASR(
        modules=hparams["modules"],
        opt_class=hparams["model_opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    asr_brain.build_test_search()

    # Batches are bounded in padded tokens, as ESPnet's length batches (MADEON's recipe).
    train_loader_kwargs, valid_loader_kwargs = loader_options(
        hparams, train_data, valid_data, length_func=lambda row: len(encode(row["units"], row["wrd"]))
    )
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=train_loader_kwargs,
        valid_loader_kwargs=valid_loader_kwargs,
    )
    evaluate_test_sets(asr_brain, hparams, test_datasets)
    run_on_main(
        export_inference_folder,
        args=[hparams, "decoder_only", tokenizer.prefix_model_file + ".model"],
        kwargs={"kmeans_file": os.path.join(os.path.dirname(unit_csvs[TRAIN]), "kmeans.pt")},
    )
