#!/usr/bin/env python3
"""Recipe for training a CTC speech recognizer (ConMamba or Conformer encoder).

The pipeline is: waveform (speed-perturbed per utterance on the device at training)
-> Fbank -> global normalization -> time/frequency masking (training only)
-> CNN front-end -> SpeechEncoder (ConMamba, Conformer, ...) -> linear -> CTC.
Validation decodes greedily and reports WER and CER every epoch; the best
checkpoints by valid WER are averaged and decoded with a CTC beam search at
test. The encoder is chosen in the yaml file only.

To run on LibriSpeech:
> python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder /path/to/LibriSpeech

To run the small demo shipped with the repository (CPU, a few minutes):
> python train_CTC.py hparams/CTC/demo_conmamba.yaml

Authors
 * Mamba-ASR recipes contributors
"""

import sys

import torch

import speechbrain as sb
from speechbrain.utils.distributed import run_on_main

from librispeech_prepare import prepare_librispeech
from modules.inference.folders import export_inference_folder
from modules.models.front_end import encoder_input
from modules.training.hparams import load_hparams
from modules.training.ngram import prepare_ngram_lm
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


# Every key of the yaml that this recipe reads: checked before any work is done
# (tests/test_config_checks.py keeps the list complete).
REQUIRED_HPARAMS = """
    CNN avg_checkpoints bad_data blank_index bos_index cer_computer character_coverage checkpointer
    compile_layers compute_features cuda_graphs ctc_cost data_folder dev_splits dynamic_batch_sampler_train
    dynamic_batch_sampler_valid dynamic_batching encoder eos_index epoch_counter error_rate_computer
    fea_augment log_softmax max_duration model model_opt_class modules ngram_lm_file ngram_order
    noam_annealing num_workers output_folder output_neurons sample_rate select_n_sentences skip_prep
    sorting speech_encoder speed_perturb test_csv test_dataloader_opts test_search test_splits token_type
    tokenizer_folder train_csv train_dataloader_opts train_logger train_splits valid_csv
    valid_dataloader_opts
""".split()


class ASR(RecipeBrain):
    """CTC training, greedy validation and beam-search testing."""

    best_key = {"min_key": "WER"}

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC log-probabilities (B, T, output_neurons)."""
        speed_perturb = self.hparams.speed_perturb if stage == sb.Stage.TRAIN else None
        wavs, wav_lens = audio_on_device(batch, self.device, speed_perturb)

        # Exact per-utterance frame counts: an utterance's output does not depend on its batch
        src, src_lens = encoder_input(
            self.hparams.compute_features,
            self.modules.normalize,
            self.modules.CNN,
            wavs,
            wav_lens,
            augment=self.hparams.fea_augment if stage == sb.Stage.TRAIN else None,
            epoch=self.hparams.epoch_counter.current,
        )
        enc_out = self.modules.speech_encoder(src, src_lens)
        logits = self.modules.ctc_lin(enc_out)
        p_ctc = self.hparams.log_softmax(logits)
        return p_ctc, src_lens

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; at valid/test also decodes and updates WER and CER."""
        p_ctc, enc_lens = predictions
        tokens, tokens_lens = batch.tokens

        if stage == sb.Stage.TRAIN:
            # The augmenter may add augmented copies: replicate the labels.
            tokens = self.hparams.fea_augment.replicate_labels(tokens)
            tokens_lens = self.hparams.fea_augment.replicate_labels(tokens_lens)

        loss = self.hparams.ctc_cost(p_ctc, tokens, enc_lens, tokens_lens)

        if stage != sb.Stage.TRAIN:
            if stage == sb.Stage.VALID:
                hyps = sb.decoders.ctc_greedy_decode(
                    p_ctc, enc_lens, blank_id=self.hparams.blank_index
                )
                texts = [self.tokenizer.sp.decode_ids(h) for h in hyps]
            else:
                hyps = self.test_search(p_ctc, enc_lens)
                texts = [nbest[0].text for nbest in hyps]
            predicted_words = [text.split() for text in texts]
            target_words = [wrd.split() for wrd in batch.wrd]
            self.wer_metric.append(batch.id, predicted_words, target_words)
            self.cer_metric.append(batch.id, predicted_words, target_words)

        return loss

    def on_stage_start(self, stage, epoch):
        """Fresh WER/CER trackers for each validation or test pass."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def evaluation_stats(self, stage):
        """CER and WER of the pass."""
        return {"CER": self.cer_metric.summarize("error_rate"), "WER": self.wer_metric.summarize("error_rate")}


def dataio_prepare(hparams, tokenizer):
    """Datasets with the items ``sig`` (audio), ``wrd`` and ``tokens``.

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
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.sp.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "wrd", "tokens"])
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
    tokenizer = train_tokenizer(hparams)  # characters in the published CTC configs
    train_data, valid_data, test_datasets = dataio_prepare(hparams, tokenizer)  # checks the manifests
    if hparams["ngram_lm_file"]:  # the word LM of the test beam search
        run_on_main(prepare_ngram_lm, args=[hparams["train_csv"], hparams["ngram_order"], hparams["ngram_lm_file"]])

    asr_brain = ASR(
        modules=hparams["modules"],
        opt_class=hparams["model_opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    vocab_list = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.sp.vocab_size())]
    asr_brain.build_test_search(vocab_list=vocab_list)

    train_loader_kwargs, valid_loader_kwargs = loader_options(hparams, train_data, valid_data)
    speed_up_training(hparams)  # the yaml's compile_layers or cuda_graphs
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=train_loader_kwargs,
        valid_loader_kwargs=valid_loader_kwargs,
    )
    evaluate_test_sets(asr_brain, hparams, test_datasets)
    run_on_main(export_inference_folder, args=[hparams, "CTC", tokenizer.prefix_model_file + ".model"])
