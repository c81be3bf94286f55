#!/usr/bin/env python3
"""Recipe for training a joint CTC/attention encoder-decoder speech recognizer.

The pipeline is: waveform (speed-perturbed per utterance on the device at training)
-> Fbank -> global normalization -> time/frequency masking and time warping
(training only) -> CNN front-end -> encoder (ConMamba, Conformer, ...) -> CTC
head, and -> decoder (Transformer or Mamba) over the embedded previous tokens
-> attention head. The loss is ctc_weight * CTC + (1 - ctc_weight) * KL
divergence with label smoothing. Validation reports the token accuracy every
epoch and the WER of a joint CTC/attention beam search every
valid_search_interval epochs; the best checkpoints by valid accuracy are
averaged and decoded with a wider beam (optionally with a Transformer LM) at
test. Encoder and decoder are chosen in the yaml file only.

To run on LibriSpeech:
> python train_S2S.py hparams/S2S/conmamba_large.yaml --data_folder /path/to/LibriSpeech

To run the small demo shipped with the repository (CPU, a few minutes):
> python train_S2S.py hparams/S2S/demo_conmamba.yaml

Authors
 * Mamba-ASR recipes contributors
"""

import logging
import sys

import torch

import speechbrain as sb
from speechbrain.decoders.scorer import ScorerBuilder
from speechbrain.utils.distributed import run_on_main

from librispeech_prepare import prepare_librispeech
from modules.inference.folders import export_inference_folder
from modules.models.front_end import encoder_input
from modules.training.hparams import load_hparams
from modules.training.recipe import (
    RecipeBrain,
    add_audio_pipeline,
    audio_on_device,
    csv_name,
    evaluate_test_sets,
    load_datasets,
    loader_options,
    lock_output_folder,
    prepare_manifests,
    speed_up_training,
    train_tokenizer,
)

logger = logging.getLogger(__name__)


# Every key of the yaml that this recipe reads: checked before any work is done
# (tests/test_config_checks.py keeps the list complete).
REQUIRED_HPARAMS = """
    CNN acc_computer avg_checkpoints bad_data bos_index character_coverage checkpointer compile_layers
    compute_features ctc_cost ctc_scorer cuda_graphs ctc_weight ctc_weight_decode data_folder dev_splits
    dynamic_batch_sampler_train dynamic_batch_sampler_valid dynamic_batching encoder encoder_decoder eos_index
    epoch_counter error_rate_computer fea_augment lm_file lm_model lm_scorer lm_weight log_softmax
    max_duration model model_opt_class modules noam_annealing num_workers output_folder
    output_neurons sample_rate select_n_sentences seq_cost skip_prep sorting speech_encoder speed_perturb test_csv
    test_dataloader_opts test_search test_splits token_type tokenizer_folder train_csv
    train_dataloader_opts train_logger train_splits valid_csv valid_dataloader_opts valid_search
    valid_search_interval
""".split()


class ASR(RecipeBrain):
    """Joint CTC/attention training, validation and beam-search testing."""

    best_key = {"max_key": "ACC"}

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC and attention log-probabilities (and hypotheses).

        Hypotheses come from a beam search at test, and at validation every
        valid_search_interval epochs; None otherwise.
        """
        speed_perturb = self.hparams.speed_perturb if stage == sb.Stage.TRAIN else None
        wavs, wav_lens = audio_on_device(batch, self.device, speed_perturb)
        tokens_bos, _ = batch.tokens_bos

        # Exact per-utterance frame counts: an utterance's output does not depend on its batch
        src, enc_lens = encoder_input(
            self.hparams.compute_features,
            self.modules.normalize,
            self.modules.CNN,
            wavs,
            wav_lens,
            augment=self.hparams.fea_augment if stage == sb.Stage.TRAIN else None,
            epoch=self.hparams.epoch_counter.current,
        )
        if stage == sb.Stage.TRAIN:
            tokens_bos = self.hparams.fea_augment.replicate_labels(tokens_bos)

        enc_out, dec_out = self.modules.encoder_decoder(
            src, enc_lens, tokens_bos
        )
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_seq = self.hparams.log_softmax(self.modules.seq_lin(dec_out))

        hyps = None
        if self.is_search_stage(stage):
            searcher = (
                self.hparams.valid_search
                if stage == sb.Stage.VALID
                else self.test_search
            )
            hyps, _, _, _ = searcher(enc_out.detach(), enc_lens)
        return p_ctc, p_seq, enc_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """Joint CTC/KL loss; at valid/test also token accuracy and WER."""
        p_ctc, p_seq, enc_lens, hyps = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens

        if stage == sb.Stage.TRAIN:
            # The augmenter may add augmented copies: replicate the labels.
            replicate = self.hparams.fea_augment.replicate_labels
            tokens_eos = replicate(tokens_eos)
            tokens_eos_lens = replicate(tokens_eos_lens)
            tokens = replicate(tokens)
            tokens_lens = replicate(tokens_lens)

        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, enc_lens, tokens_lens)
        loss_seq = self.hparams.seq_cost(
            p_seq, tokens_eos, length=tokens_eos_lens
        )
        ctc_weight = self.hparams.ctc_weight
        loss = ctc_weight * loss_ctc + (1 - ctc_weight) * loss_seq

        if stage != sb.Stage.TRAIN:
            self.acc_metric.append(p_seq, tokens_eos, tokens_eos_lens)
            if hyps is not None:
                predicted_words = [
                    self.tokenizer.sp.decode_ids(h).split() for h in hyps
                ]
                target_words = [wrd.split() for wrd in batch.wrd]
                self.wer_metric.append(
                    batch.id, predicted_words, target_words
                )
        return loss

    def is_search_stage(self, stage):
        """Whether this stage decodes with a beam search (compute_forward)."""
        if stage == sb.Stage.VALID:
            epoch = self.hparams.epoch_counter.current
            return epoch % self.hparams.valid_search_interval == 0
        return stage == sb.Stage.TEST

    def on_stage_start(self, stage, epoch):
        """Fresh accuracy/WER trackers for each validation or test pass."""
        if stage != sb.Stage.TRAIN:
            self.acc_metric = self.hparams.acc_computer()
            self.wer_metric = self.hparams.error_rate_computer()

    def evaluation_stats(self, stage):
        """Token accuracy, and the WER of the passes that search (:meth:`is_search_stage`)."""
        stage_stats = {"ACC": self.acc_metric.summarize()}
        if self.is_search_stage(stage):
            stage_stats["WER"] = self.wer_metric.summarize("error_rate")
        return stage_stats


def build_test_scorer(hparams, device):
    """Joint CTC/attention scorer for test, with Transformer LM shallow fusion
    when hparams["lm_file"] is set (a local state dict, nothing downloaded)."""
    scorers = [hparams["ctc_scorer"]]
    weights = {"ctc": hparams["ctc_weight_decode"]}
    if hparams["lm_file"]:
        lm = hparams["lm_model"]()
        lm.load_state_dict(torch.load(hparams["lm_file"], map_location="cpu", weights_only=True))
        scorers.append(hparams["lm_scorer"](language_model=lm.to(device)))
        weights["transformerlm"] = hparams["lm_weight"]
        logger.info(f"Test decoding with the LM {hparams['lm_file']}")
    return ScorerBuilder(full_scorers=scorers, weights=weights)


def dataio_prepare(hparams, tokenizer):
    """Datasets with the items ``sig`` (audio), ``wrd``, ``tokens_bos``, ``tokens_eos`` and ``tokens``.

    Returns the train and valid sets and {test set name: set}.
    """
    train_data, valid_data, test_datasets = load_datasets(
        hparams,
        hparams["train_csv"],
        hparams["valid_csv"],
        {csv_name(path): path for path in hparams["test_csv"]},
    )
    datasets = [train_data, valid_data] + list(test_datasets.values())
    add_audio_pipeline(hparams, datasets)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(wrd):
        yield wrd
        tokens = tokenizer.sp.encode_as_ids(wrd)
        yield torch.LongTensor([hparams["bos_index"]] + tokens)
        yield torch.LongTensor(tokens + [hparams["eos_index"]])
        yield torch.LongTensor(tokens)

    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(
        datasets, ["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens"]
    )
    return train_data, valid_data, test_datasets


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

    prepare_manifests(hparams, prepare_librispeech)
    tokenizer = train_tokenizer(hparams)  # unigram subwords in the published configs
    train_data, valid_data, test_datasets = dataio_prepare(hparams, tokenizer)

    asr_brain = ASR(
        modules=hparams["modules"],
        opt_class=hparams["model_opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    asr_brain.build_test_search(scorer=build_test_scorer(hparams, asr_brain.device))

    train_loader_kwargs, valid_loader_kwargs = loader_options(hparams, train_data, valid_data)
    speed_up_training(hparams, seq2seq=hparams["encoder_decoder"])  # the yaml's compile_layers or cuda_graphs
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=train_loader_kwargs,
        valid_loader_kwargs=valid_loader_kwargs,
    )
    evaluate_test_sets(asr_brain, hparams, test_datasets)
    run_on_main(export_inference_folder, args=[hparams, "S2S", tokenizer.prefix_model_file + ".model"])
