"""What the three training scripts share: manifests, datasets and batching, averaging, testing.

Each ``train_*.py`` keeps SpeechBrain's recipe shape (a ``Brain`` subclass, ``dataio_prepare``, a
``__main__``); the pieces that would otherwise be copied between them live here.
"""

import logging
import os

import speechbrain as sb
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main

from librispeech_prepare import prepare_librispeech

logger = logging.getLogger(__name__)


class RecipeBrain(sb.Brain):
    """A ``Brain`` that tests with the average of its best checkpoints and writes the test WER.

    Subclasses call :meth:`log_test_stats` at the end of the test stage; the main script sets
    ``test_wer_file`` before each ``evaluate`` (see :func:`evaluate_test_sets`).
    """

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Loads the average of the ``hparams.avg_checkpoints`` best checkpoints into the model."""
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        checkpoints = self.checkpointer.find_checkpoints(
            max_key=max_key, min_key=min_key, max_num_checkpoints=self.hparams.avg_checkpoints
        )
        averaged = sb.utils.checkpoints.average_checkpoints(checkpoints, recoverable_name="model")
        self.hparams.model.load_state_dict(averaged, strict=True)
        self.hparams.model.eval()
        logger.info(f"Loaded the average of {len(checkpoints)} checkpoints.")

    def log_test_stats(self, stage_stats):
        """Logs the test statistics and writes the per-utterance WER report to ``test_wer_file``."""
        self.test_stats = stage_stats
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stage_stats
        )
        if if_main_process():
            with open(self.test_wer_file, "w", encoding="utf-8") as w:
                self.wer_metric.write_stats(w)


def prepare_manifests(hparams):
    """One csv per split of ``data_folder`` (training splits merged into train.csv), on the main process."""
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


def train_tokenizer(hparams):
    """SentencePiece model trained on the training transcripts (type, size and ids from the yaml).

    Id 0 is <unk>, the CTC blank and the padding. The folder is made here because SentencePiece's
    own check-then-create races between DDP processes.
    """
    os.makedirs(hparams["tokenizer_folder"], exist_ok=True)
    return SentencePiece(
        model_dir=hparams["tokenizer_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=hparams["train_csv"],
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=hparams["character_coverage"],
        bos_id=hparams["bos_index"],
        eos_id=hparams["eos_index"],
    )


def csv_name(path):
    """A data set's name: its csv file name without folder and extension."""
    return os.path.splitext(os.path.basename(path))[0]


def load_datasets(hparams, train_csv, valid_csv, test_csvs):
    """Train, valid and {name: test} datasets; training order from ``hparams["sorting"]``.

    Evaluation sets are sorted by duration, which makes batches with little padding.
    """

    def load(path):
        return sb.dataio.dataset.DynamicItemDataset.from_csv(
            csv_path=path, replacements={"data_root": hparams["data_folder"]}
        )

    train_data = load(train_csv)
    if hparams["sorting"] in ("ascending", "descending"):
        train_data = train_data.filtered_sorted(
            sort_key="duration", reverse=hparams["sorting"] == "descending"
        )
        hparams["train_dataloader_opts"]["shuffle"] = False
    elif hparams["sorting"] != "random":
        raise ValueError(f"sorting must be random, ascending or descending, not {hparams['sorting']!r}")
    valid_data = load(valid_csv).filtered_sorted(sort_key="duration")
    test_datasets = {name: load(path).filtered_sorted(sort_key="duration") for name, path in test_csvs.items()}
    return train_data, valid_data, test_datasets


def add_audio_pipelines(hparams, train_data, eval_datasets):
    """Adds the item ``sig``: the waveform, speed-perturbed for training (in the loader workers)."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline_train(wav):
        sig = sb.dataio.dataio.read_audio(wav)
        return hparams["speed_perturb"](sig.unsqueeze(0)).squeeze(0)

    sb.dataio.dataset.add_dynamic_item([train_data], audio_pipeline_train)
    sb.dataio.dataset.add_dynamic_item(eval_datasets, audio_pipeline)


def loader_options(hparams, train_data, valid_data, length_func=lambda row: row["duration"]):
    """``fit``'s loader arguments: dynamic batches bounded by ``length_func`` when
    ``hparams["dynamic_batching"]`` (seconds of audio by default), else the yaml's loader options."""
    if not hparams["dynamic_batching"]:
        return hparams["train_dataloader_opts"], hparams["valid_dataloader_opts"]
    options = []
    for data, sampler_options in [
        (train_data, hparams["dynamic_batch_sampler_train"]),
        (valid_data, hparams["dynamic_batch_sampler_valid"]),
    ]:
        sampler = DynamicBatchSampler(data, length_func=length_func, **sampler_options)
        options.append({"batch_sampler": sampler, "num_workers": hparams["num_workers"]})
    return tuple(options)


def evaluate_test_sets(brain, hparams, test_datasets, **best_key):
    """Tests each set with the averaged best checkpoints (``best_key``: ``min_key=`` or ``max_key=``),
    writes ``wer_<set>.txt`` to the output folder and prints the WER."""
    for name, test_set in test_datasets.items():
        brain.test_wer_file = os.path.join(hparams["output_folder"], f"wer_{name}.txt")
        brain.evaluate(test_set, test_loader_kwargs=hparams["test_dataloader_opts"], **best_key)
        if if_main_process():
            print(f"Test WER on {name}: {brain.test_stats['WER']:.2f} %")
