#!/usr/bin/env python3
"""Recipe for training a CTC speech recognizer (ConMamba or Conformer encoder).

The pipeline is: waveform (speed-perturbed in the data loader at training)
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

import logging
import os
import sys

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main

from librispeech_prepare import prepare_librispeech

logger = logging.getLogger(__name__)


class ASR(sb.Brain):
    """CTC training, greedy validation and beam-search testing."""

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC log-probabilities (B, T, output_neurons)."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig

        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(
            feats, wav_lens, epoch=self.hparams.epoch_counter.current
        )
        if stage == sb.Stage.TRAIN:
            feats, wav_lens = self.hparams.fea_augment(feats, wav_lens)

        src = self.modules.CNN(feats)
        enc_out = self.modules.speech_encoder(src, wav_lens)
        logits = self.modules.ctc_lin(enc_out)
        p_ctc = self.hparams.log_softmax(logits)
        return p_ctc, wav_lens

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; at valid/test also decodes and updates WER and CER."""
        p_ctc, wav_lens = predictions
        tokens, tokens_lens = batch.tokens

        if stage == sb.Stage.TRAIN:
            # The augmenter may add augmented copies: replicate the labels.
            tokens = self.hparams.fea_augment.replicate_labels(tokens)
            tokens_lens = self.hparams.fea_augment.replicate_labels(tokens_lens)

        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)

        if stage != sb.Stage.TRAIN:
            if stage == sb.Stage.VALID:
                hyps = sb.decoders.ctc_greedy_decode(
                    p_ctc, wav_lens, blank_id=self.hparams.blank_index
                )
                texts = [self.tokenizer.sp.decode_ids(h) for h in hyps]
            else:
                hyps = self.test_searcher(p_ctc, wav_lens)
                texts = [nbest[0].text for nbest in hyps]
            predicted_words = [text.split() for text in texts]
            target_words = [wrd.split() for wrd in batch.wrd]
            self.wer_metric.append(batch.id, predicted_words, target_words)
            self.cer_metric.append(batch.id, predicted_words, target_words)

        return loss

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Updates the Noam learning rate after each optimizer step."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch):
        """Fresh WER/CER trackers for each validation or test pass."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch):
        """Logs statistics, keeps the best checkpoints, writes test WER."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return

        stage_stats["CER"] = self.cer_metric.summarize("error_rate")
        stage_stats["WER"] = self.wer_metric.summarize("error_rate")

        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={
                    "epoch": epoch,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "steps": self.optimizer_step,
                },
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"WER": stage_stats["WER"], "epoch": epoch},
                min_keys=["WER"],
                num_to_keep=self.hparams.avg_checkpoints,
            )
        else:
            self.test_stats = stage_stats
            self.hparams.train_logger.log_stats(
                stats_meta={"Epochs trained": self.hparams.epoch_counter.current},
                test_stats=stage_stats,
            )
            if if_main_process():
                with open(self.test_wer_file, "w", encoding="utf-8") as w:
                    self.wer_metric.write_stats(w)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Loads the average of the best checkpoints into the model."""
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        ckpts = self.checkpointer.find_checkpoints(
            max_key=max_key,
            min_key=min_key,
            max_num_checkpoints=self.hparams.avg_checkpoints,
        )
        averaged = sb.utils.checkpoints.average_checkpoints(
            ckpts, recoverable_name="model"
        )
        self.hparams.model.load_state_dict(averaged)
        self.hparams.model.eval()
        logger.info(f"Loaded the average of {len(ckpts)} checkpoints.")


def dataio_prepare(hparams, tokenizer):
    """Builds the datasets and, with dynamic batching, their batch samplers.

    Returns
    -------
    train_data, valid_data : DynamicItemDataset
    test_datasets : dict
        Test set name (csv file name) -> DynamicItemDataset.
    train_batch_sampler, valid_batch_sampler : DynamicBatchSampler or None
    """
    data_folder = hparams["data_folder"]

    def load_csv(path):
        return sb.dataio.dataset.DynamicItemDataset.from_csv(
            csv_path=path, replacements={"data_root": data_folder}
        )

    train_data = load_csv(hparams["train_csv"])
    if hparams["sorting"] in ("ascending", "descending"):
        train_data = train_data.filtered_sorted(
            sort_key="duration", reverse=hparams["sorting"] == "descending"
        )
        hparams["train_dataloader_opts"]["shuffle"] = False
    elif hparams["sorting"] != "random":
        raise ValueError("sorting must be random, ascending or descending")

    # Sorted evaluation sets make batches with little padding.
    valid_data = load_csv(hparams["valid_csv"]).filtered_sorted(
        sort_key="duration"
    )
    test_datasets = {
        os.path.splitext(os.path.basename(csv))[0]: load_csv(
            csv
        ).filtered_sorted(sort_key="duration")
        for csv in hparams["test_csv"]
    }
    eval_datasets = [valid_data] + list(test_datasets.values())

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline_train(wav):
        # Done here so that it runs in the data loader workers.
        sig = sb.dataio.dataio.read_audio(wav)
        return hparams["speed_perturb"](sig.unsqueeze(0)).squeeze(0)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.sp.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item([train_data], audio_pipeline_train)
    sb.dataio.dataset.add_dynamic_item(eval_datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(
        [train_data] + eval_datasets, text_pipeline
    )
    sb.dataio.dataset.set_output_keys(
        [train_data] + eval_datasets, ["id", "sig", "wrd", "tokens"]
    )

    train_batch_sampler = valid_batch_sampler = None
    if hparams["dynamic_batching"]:
        train_batch_sampler = DynamicBatchSampler(
            train_data,
            length_func=lambda x: x["duration"],
            **hparams["dynamic_batch_sampler_train"],
        )
        valid_batch_sampler = DynamicBatchSampler(
            valid_data,
            length_func=lambda x: x["duration"],
            **hparams["dynamic_batch_sampler_valid"],
        )

    return (
        train_data,
        valid_data,
        test_datasets,
        train_batch_sampler,
        valid_batch_sampler,
    )


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])

    # Initialize ddp (useful only for multi-GPU DDP training)
    sb.utils.distributed.ddp_init_group(run_opts)

    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )

    # Data preparation: one csv per split, the training splits merged.
    run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["output_folder"],
            "tr_splits": hparams["train_splits"],
            "dev_splits": hparams["dev_splits"],
            "te_splits": hparams["test_splits"],
            "select_n_sentences": hparams["select_n_sentences"],
            "merge_lst": hparams["train_splits"],
            "merge_name": "train.csv",
            "skip_prep": hparams["skip_prep"],
        },
    )

    # Character tokenizer trained on the training transcripts
    # (id 0 is both <unk> and the CTC blank). The folder is made here because
    # SentencePiece's own check-then-create races between DDP processes.
    os.makedirs(hparams["tokenizer_folder"], exist_ok=True)
    tokenizer = SentencePiece(
        model_dir=hparams["tokenizer_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=hparams["train_csv"],
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=hparams["character_coverage"],
        bos_id=hparams["bos_index"],
        eos_id=hparams["eos_index"],
    )

    (
        train_data,
        valid_data,
        test_datasets,
        train_bsampler,
        valid_bsampler,
    ) = dataio_prepare(hparams, tokenizer)

    asr_brain = ASR(
        modules=hparams["modules"],
        opt_class=hparams["model_opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    vocab_list = [
        tokenizer.sp.id_to_piece(i) for i in range(tokenizer.sp.vocab_size())
    ]
    asr_brain.test_searcher = hparams["test_searcher"](vocab_list=vocab_list)

    train_dataloader_opts = hparams["train_dataloader_opts"]
    valid_dataloader_opts = hparams["valid_dataloader_opts"]
    if train_bsampler is not None:
        train_dataloader_opts = {
            "batch_sampler": train_bsampler,
            "num_workers": hparams["num_workers"],
        }
    if valid_bsampler is not None:
        valid_dataloader_opts = {
            "batch_sampler": valid_bsampler,
            "num_workers": hparams["num_workers"],
        }

    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=train_dataloader_opts,
        valid_loader_kwargs=valid_dataloader_opts,
    )

    # Test on each test set with the averaged best checkpoints.
    for name, test_set in test_datasets.items():
        asr_brain.test_wer_file = os.path.join(
            hparams["output_folder"], f"wer_{name}.txt"
        )
        asr_brain.evaluate(
            test_set,
            min_key="WER",
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
        if if_main_process():
            print(f"Test WER on {name}: {asr_brain.test_stats['WER']:.2f} %")
