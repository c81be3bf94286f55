#!/usr/bin/env python3
"""Recipe for training a joint CTC/attention encoder-decoder speech recognizer.

The pipeline is: waveform (speed-perturbed in the data loader at training)
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
import os
import sys

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.decoders.scorer import ScorerBuilder
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main

logger = logging.getLogger(__name__)


class ASR(sb.Brain):
    """Joint CTC/attention training, validation and beam-search testing."""

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC and attention log-probabilities (and hypotheses).

        Hypotheses come from a beam search at test, and at validation every
        valid_search_interval epochs; None otherwise.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos

        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(
            feats, wav_lens, epoch=self.hparams.epoch_counter.current
        )
        if stage == sb.Stage.TRAIN:
            feats, wav_lens = self.hparams.fea_augment(feats, wav_lens)
            tokens_bos = self.hparams.fea_augment.replicate_labels(tokens_bos)

        src = self.modules.CNN(feats)
        enc_out, dec_out = self.modules.encoder_decoder(
            src, wav_lens, tokens_bos
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
            hyps, _, _, _ = searcher(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps

    def compute_objectives(self, predictions, batch, stage):
        """Joint CTC/KL loss; at valid/test also token accuracy and WER."""
        p_ctc, p_seq, wav_lens, hyps = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens

        if stage == sb.Stage.TRAIN:
            # The augmenter may add augmented copies: replicate the labels.
            replicate = self.hparams.fea_augment.replicate_labels
            tokens_eos = replicate(tokens_eos)
            tokens_eos_lens = replicate(tokens_eos_lens)
            tokens = replicate(tokens)
            tokens_lens = replicate(tokens_lens)

        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
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

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Updates the Noam learning rate after each optimizer step."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch):
        """Fresh accuracy/WER trackers for each validation or test pass."""
        if stage != sb.Stage.TRAIN:
            self.acc_metric = self.hparams.acc_computer()
            self.wer_metric = self.hparams.error_rate_computer()

    def on_stage_end(self, stage, stage_loss, epoch):
        """Logs stats, keeps the best checkpoints (valid ACC), writes WER."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return

        stage_stats["ACC"] = self.acc_metric.summarize()
        if self.is_search_stage(stage):
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
                meta={"ACC": stage_stats["ACC"], "epoch": epoch},
                max_keys=["ACC"],
                num_to_keep=self.hparams.avg_checkpoints,
            )
        else:
            self.test_stats = stage_stats
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
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
        self.hparams.model.load_state_dict(averaged, strict=True)
        self.hparams.model.eval()
        logger.info(f"Loaded the average of {len(ckpts)} checkpoints.")


def build_test_scorer(hparams, device):
    """Joint CTC/attention scorer for test, with Transformer LM shallow fusion
    when hparams["lm_file"] is set (a local state dict, nothing downloaded)."""
    scorers = [hparams["ctc_scorer"]]
    weights = {"ctc": hparams["ctc_weight_decode"]}
    if hparams["lm_file"]:
        lm = hparams["lm_model"]()
        lm.load_state_dict(torch.load(hparams["lm_file"], map_location="cpu"))
        scorers.append(hparams["lm_scorer"](language_model=lm.to(device)))
        weights["transformerlm"] = hparams["lm_weight"]
        logger.info(f"Test decoding with the LM {hparams['lm_file']}")
    return ScorerBuilder(full_scorers=scorers, weights=weights)


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
    @sb.utils.data_pipeline.provides(
        "wrd", "tokens_bos", "tokens_eos", "tokens"
    )
    def text_pipeline(wrd):
        yield wrd
        tokens = tokenizer.sp.encode_as_ids(wrd)
        yield torch.LongTensor([hparams["bos_index"]] + tokens)
        yield torch.LongTensor(tokens + [hparams["eos_index"]])
        yield torch.LongTensor(tokens)

    sb.dataio.dataset.add_dynamic_item([train_data], audio_pipeline_train)
    sb.dataio.dataset.add_dynamic_item(eval_datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(
        [train_data] + eval_datasets, text_pipeline
    )
    sb.dataio.dataset.set_output_keys(
        [train_data] + eval_datasets,
        ["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens"],
    )

    train_batch_sampler = valid_batch_sampler = None
    if hparams["dynamic_batching"]:
        from speechbrain.dataio.sampler import DynamicBatchSampler

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
    from librispeech_prepare import prepare_librispeech  # noqa: E402

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

    # Subword tokenizer trained on the training transcripts (id 0 is <unk>,
    # the CTC blank and the padding). The folder is made here because
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
    asr_brain.test_search = hparams["test_search"](
        scorer=build_test_scorer(hparams, asr_brain.device)
    )

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
            max_key="ACC",
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
        if if_main_process():
            print(f"Test WER on {name}: {asr_brain.test_stats['WER']:.2f} %")
