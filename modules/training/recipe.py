"""What the three training scripts share: manifests, datasets and batching, averaging, testing.

Each ``train_*.py`` keeps SpeechBrain's recipe shape (a ``Brain`` subclass, ``dataio_prepare``, a
``__main__``); the pieces that would otherwise be copied between them live here.
"""

import datetime
import fcntl
import logging
import os
import socket

import speechbrain as sb
import torch
from speechbrain.dataio.dataio import merge_csvs
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main

from modules.training.checkpointing import average_checkpoints
from modules.training.cuda_graphs import GraphedTeacherForcing, use_cuda_graphs
from modules.training.data_checks import (
    BadDataError,
    collate_readable,
    load_manifest,
    read_checked_audio,
    read_manifest,
)
from modules.training.device_copies import to_device
from modules.training.running_mean import DeviceRunningMean, HostCopy
from modules.training.sentencepiece_models import ALPHABET, train_sentencepiece

logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
_held_locks = []  # lock files of the output folders this process writes to, open until it ends


class OutputFolderInUse(RuntimeError):
    """Another run is writing to the output folder."""


def lock_output_folder(output_folder):
    """Makes this run the only one writing to ``output_folder`` until its process ends.

    Two runs sharing an output folder crash in data preparation, resume from each other's state or
    both report WERs of mixed states. The lock is an ``flock`` of ``<output_folder>/run.lock``, which
    the kernel releases when the process ends, even killed with SIGKILL: the lock file a killed run
    leaves is stale and does not block the next run. Main process only (a DDP run's processes share
    the folder).
    """
    if not if_main_process():
        return
    os.makedirs(output_folder, exist_ok=True)
    lock = open(os.path.join(output_folder, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a run starting"
        lock.close()
        raise OutputFolderInUse(
            f"The output folder {output_folder} is in use by another run ({holder}). Wait until it ends, "
            "or give this run another --output_folder."
        ) from None
    lock.truncate(0)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    lock.flush()
    _held_locks.append(lock)


class RecipeBrain(sb.Brain):
    """A ``Brain`` that skips and counts optimizer steps with a NaN or inf loss or gradient, steps the
    learning-rate schedule, keeps the best checkpoints, tests with their average and writes the test WER.

    Subclasses set :attr:`best_key` and give their validation and test statistics in
    :meth:`evaluation_stats`; the main script sets ``test_wer_file`` before each ``evaluate`` (see
    :func:`evaluate_test_sets`). The hooks here read only hparams keys that every recipe has.
    """

    nonfinite_loss = None  # on the device: a NaN or inf loss since the last optimizer step (None: none noted)
    running_loss = None  # the epoch's training losses (a DeviceRunningMean), on the device
    # (HostCopy of the step's (loss faults, gradient faults), its optimizer step number) noted by
    # check_gradients and not yet counted; None: none
    pending_faults = None
    # The validation statistic that ranks the checkpoints, kept at validation and averaged at test, in
    # the keyword of SpeechBrain's ``evaluate``: {"min_key": "WER"} or {"max_key": "ACC"}
    best_key = None

    def fit_batch(self, batch):
        """SpeechBrain's training step (forward, backward, an optimizer step every
        ``grad_accumulation_factor`` batches), returning the loss on the device: SpeechBrain's reads it
        back at once, which makes the host wait for the GPU every step (see :meth:`update_average`)."""
        should_step = self.step % self.grad_accumulation_factor == 0
        self.on_fit_batch_start(batch, should_step)
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            scaled_loss = self.scaler.scale(loss / self.grad_accumulation_factor)
            self.check_loss_isfinite(scaled_loss)
            scaled_loss.backward()
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach()

    def update_average(self, loss, avg_loss):
        """The mean of the epoch's finite losses so far. Training losses are summed on their device and
        read one step late (:class:`DeviceRunningMean`); the epoch's mean is exact (:meth:`on_stage_end`)."""
        if not self.modules.training:  # validation and test losses, read back by SpeechBrain anyway
            return super().update_average(loss, avg_loss)
        if self.running_loss is None:  # the epoch's first step, or the first after resuming mid-epoch
            self.running_loss = DeviceRunningMean(avg_loss, self.step - 1)
        return self.running_loss.add(loss)

    def check_loss_isfinite(self, loss):
        """Notes a NaN or inf loss on the device, without waiting for the GPU; the optimizer step reads
        it (:meth:`check_gradients`, or :meth:`on_fit_batch_end` when that check does not run) and is skipped."""
        nonfinite = torch.isfinite(loss).logical_not()
        self.nonfinite_loss = nonfinite if self.nonfinite_loss is None else self.nonfinite_loss | nonfinite

    def take_nonfinite_loss(self):
        """The noted NaN or inf losses since the last optimizer step (a 0/1 tensor), forgotten."""
        noted = self.nonfinite_loss if self.nonfinite_loss is not None else torch.zeros((), dtype=torch.bool)
        self.nonfinite_loss = None
        return noted.to(self.device).int()

    def check_gradients(self):
        """Skips the whole optimizer step after a NaN or inf loss or gradient, on every process.

        SpeechBrain's own check drops only the parameters concerned and counts nothing, so a persistent
        fault would stall training silently. Runs with ``skip_nonfinite_grads: True`` and without fp16's
        GradScaler, which skips such steps itself. A fused optimizer (``fused: True``, as in every yaml
        here) skips the step on the device, through the ``found_inf`` flag that GradScaler also sets,
        and the skip is counted one step later (:meth:`count_pending_faults`), so the host does not wait
        for the GPU here and can queue the next step while the GPU runs this one's backward. For other
        optimizers the host reads the faults at once and drops the gradients.
        """
        self.count_pending_faults()  # the previous step's, long done on the device
        params = [p for p in self.modules.parameters() if p.grad is not None]
        # one fused norm over all gradients (NaN and inf propagate), not a few launches per parameter
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        grad_faults = torch.stack([n.float() for n in norms]).isfinite().logical_not().sum() if norms else 0
        faults = torch.stack([self.take_nonfinite_loss(), torch.as_tensor(grad_faults, device=self.device).int()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(faults)  # the processes must all step, or all skip
        self.pending_faults = (HostCopy(faults), self.optimizer_step + 1)
        if all(group.get("fused") for group in self.optimizer.param_groups):
            self.optimizer.found_inf = (faults.sum() > 0).float()  # read by the fused step on the device
        elif self.count_pending_faults():
            for p in params:
                p.grad = None

    def count_pending_faults(self):
        """Counts the step noted by :meth:`check_gradients` if it had a NaN or inf loss or gradient, and
        forgets it; returns whether it had one. Waits for the GPU only if it has not yet run that step."""
        if self.pending_faults is None:
            return False
        (faults, step), self.pending_faults = self.pending_faults, None
        loss_faults, grad_faults = faults.tolist()
        if loss_faults or grad_faults:
            self.count_nonfinite_step("loss" if loss_faults else "gradient", step)
        return bool(loss_faults or grad_faults)

    def count_nonfinite_step(self, what, step):
        """Logs skipped optimizer step ``step``; stops training after ``nonfinite_patience`` of them in an
        epoch."""
        self.nonfinite_count += 1
        epoch = self.hparams.epoch_counter.current
        if self.nonfinite_count > self.nonfinite_patience:
            raise FloatingPointError(
                f"Training stopped: {self.nonfinite_count} optimizer steps of epoch {epoch} had a NaN or inf "
                f"{what}, more than nonfinite_patience ({self.nonfinite_patience}). Lower the learning rate, "
                "train in fp32 (precision: fp32) or check the data; torch.autograd.detect_anomaly() finds "
                "the operation that first gives a NaN."
            )
        logger.warning(
            f"Skipped optimizer step {step} (epoch {epoch}): NaN or inf {what} "
            f"({self.nonfinite_count} of at most {self.nonfinite_patience} skipped steps this epoch)"
        )

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's loaders, made so that a run resumed mid-epoch trains on the batches, in the
        order and with the random draws of the uninterrupted run.

        The training loader draws its workers' seed from its own generator, not from the global
        ones that the checkpoint restores (``modules/training/checkpointing.py``). A dynamic batch sampler
        gets ``set_epoch`` each epoch: SpeechBrain calls it only under DDP, and without it the
        batch order depends on how many epochs this process has run, not on the epoch.
        """
        if stage != sb.Stage.TRAIN:
            return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        loader_kwargs.setdefault("generator", torch.Generator().manual_seed(torch.initial_seed()))
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if self.train_sampler is None and hasattr(loader.batch_sampler, "set_epoch"):
            self.train_sampler = loader.batch_sampler
        return loader

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Updates the learning rate (``noam_annealing``) after each optimizer step; notes a NaN or inf
        loss that :meth:`check_gradients` did not read (fp16's GradScaler skipped the step itself), to be
        counted one step later as that method's are."""
        if should_step:
            vars(self.optimizer).pop("found_inf", None)  # check_gradients' flag served this step only
            if self.nonfinite_loss is not None:  # not read by check_gradients
                self.count_pending_faults()
                no_gradient_faults = torch.zeros((), dtype=torch.int, device=self.device)
                faults = torch.stack([self.take_nonfinite_loss(), no_gradient_faults])
                self.pending_faults = (HostCopy(faults), self.optimizer_step)
            self.hparams.noam_annealing(self.optimizer)

    def build_test_search(self, **run_time_arguments):
        """The recipe's test searcher, ``self.test_search``: the yaml's ``test_search`` (a ``!name:``
        searcher with its options, wired in the yaml as the models are) completed with what exists only
        at run time: the tokenizer's vocabulary (CTC), the scorer with its optional LM (S2S), nothing
        (decoder-only)."""
        self.test_search = self.hparams.test_search(**run_time_arguments)

    def evaluation_stats(self, stage):
        """The statistics of a validation or test pass besides the loss, {name: value} (the recipe's)."""
        raise NotImplementedError

    def on_stage_end(self, stage, stage_loss, epoch):
        """Keeps the training loss; after validation logs the epoch and saves a checkpoint, keeping the
        ``avg_checkpoints`` best by :attr:`best_key`; after a test logs and writes the WER."""
        if stage == sb.Stage.TRAIN:
            self.count_pending_faults()  # the epoch's last step
        if stage == sb.Stage.TRAIN and self.running_loss is not None:
            stage_loss, self.running_loss = self.running_loss.mean(), None  # exact, all steps read
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats.update(self.evaluation_stats(stage))
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "steps": self.optimizer_step},
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            key = self.best_key.get("min_key") or self.best_key["max_key"]
            self.checkpointer.save_and_keep_only(
                meta={key: stage_stats[key], "epoch": epoch},
                min_keys=[key] if "min_key" in self.best_key else [],
                max_keys=[key] if "max_key" in self.best_key else [],
                num_to_keep=self.hparams.avg_checkpoints,
            )
        else:
            self.log_test_stats(stage_stats)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Loads the average of the ``hparams.avg_checkpoints`` best checkpoints into the model."""
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        checkpoints = self.checkpointer.find_checkpoints(
            max_key=max_key, min_key=min_key, max_num_checkpoints=self.hparams.avg_checkpoints
        )
        averaged = average_checkpoints(checkpoints, recoverable_name="model")
        self.hparams.model.load_state_dict(averaged, strict=True)
        self.hparams.model.eval()

    def log_test_stats(self, stage_stats):
        """Logs the test statistics and writes the per-utterance WER report to ``test_wer_file``."""
        self.test_stats = stage_stats
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stage_stats
        )
        if if_main_process():
            with open(self.test_wer_file, "w", encoding="utf-8") as w:
                self.wer_metric.write_stats(w)


def speed_up_training(hparams, seq2seq=None):
    """Applies the yaml's ``compile_layers`` (:func:`compile_layers` on ``encoder``, dynamic shapes) or
    ``cuda_graphs`` (:func:`modules.training.cuda_graphs.use_cuda_graphs` on ``speech_encoder``, on
    the ``CNN`` front-end, whose buckets of 128 feature frames give 32 encoder frames after the
    yamls' two stride-2 blocks, and on the teacher-forced decoding of ``seq2seq``, a
    :class:`modules.models.seq2seq.Seq2SeqModel`, if given); eager training when both are False."""
    if hparams["compile_layers"] and hparams["cuda_graphs"]:
        raise ValueError("compile_layers and cuda_graphs are alternatives: set one of them to False")
    if hparams["compile_layers"]:
        compile_layers(hparams["encoder"], dynamic=True)
    if hparams["cuda_graphs"] and use_cuda_graphs(hparams["speech_encoder"]):
        CNN = hparams["CNN"]
        use_cuda_graphs(CNN, output_frames=CNN.output_frames, frame_multiple=128)
        if seq2seq is not None:
            use_cuda_graphs(seq2seq, GraphedTeacherForcing)


def compile_layers(encoder, **options):
    """``torch.compile`` each layer of ``encoder.layers`` (a ConMamba or Conformer stack) for training,
    in place, with ``options`` (e.g. ``dynamic=True``: one compilation for every batch shape).

    The layers run the same code, so one compilation serves them all, where compiling the whole
    encoder traces every layer anew (regional compilation), and SpeechBrain's CNN front-end stays
    eager (Inductor in PyTorch 2.11 fails on it with dynamic shapes, RESULTS.md). Only steps with
    gradients run compiled: validation and test (no gradients, another autocast state, batches of one
    utterance) would each need a graph of their own for a few seconds of work, so they run eager.
    A layer's input is cast to its parameters' dtype, the dtype its LayerNorms return under autocast,
    so that the first layer (fed in bfloat16 by the front-end) shares the graph of the others. In
    place, so the state_dict names do not change and checkpoints load into eager models as they are.
    """
    for layer in encoder.layers:
        layer.forward = _compiled_for_training(layer.forward, next(layer.parameters()).dtype, **options)


def _compiled_for_training(forward, dtype, **options):
    compiled = torch.compile(forward, **options)

    def forward_with_gradients_compiled(x, *args, **kwargs):
        if torch.is_grad_enabled():
            return compiled(x.to(dtype), *args, **kwargs)
        return forward(x, *args, **kwargs)

    return forward_with_gradients_compiled


def prepare_manifests(hparams, prepare):
    """One csv per split of ``data_folder`` (training splits merged into train.csv), on the main process.

    ``prepare`` is the data preparation function, with the keyword arguments of SpeechBrain's LibriSpeech
    recipes: the train script imports it from its prepare script (``librispeech_prepare.prepare_librispeech``),
    SpeechBrain's convention, so that nothing under ``modules/`` imports a script of the repository's root.

    A ``valid_csv`` that is none of the dev splits' csvs (e.g. ``dev.csv`` next to ``dev-clean.csv`` and
    ``dev-other.csv``) is written as all the dev splits merged: MADEON validates on both (arXiv 2411.06968).
    """
    run_on_main(
        prepare,
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
            "bad_data": hparams["bad_data"],
        },
    )
    folder, valid_name = os.path.split(hparams["valid_csv"])
    split_names = [f"{split}.csv" for split in hparams["dev_splits"]]
    if valid_name not in split_names:
        run_on_main(merge_csvs, kwargs={"data_folder": folder, "csv_lst": split_names, "merged_csv": valid_name})


def train_tokenizer(hparams):
    """SentencePiece model of the training transcripts (type, size and ids from the yaml), checked to
    fit the output layer (:func:`check_tokenizer_fits`).

    Every character of ALPHABET is in the vocabulary, seen in the transcripts or not, so that a
    character tokenizer has the same tokens on any LibriSpeech-style corpus: output_neurons (31) with
    <unk>, <s>, </s> and the word boundary. Id 0 is <unk>, the CTC blank and the padding.
    """
    run_on_main(
        train_sentencepiece,
        kwargs={
            "lines": (row["wrd"] for row in read_manifest(hparams["train_csv"])[0].values()),
            "model_dir": hparams["tokenizer_folder"],
            "vocab_size": hparams["output_neurons"],
            "model_type": hparams["token_type"],
            "character_coverage": hparams["character_coverage"],
            "required_chars": ALPHABET,
            "max_sentencepiece_length": 10,
            "unk_id": 0,
            "bos_id": hparams["bos_index"],
            "eos_id": hparams["eos_index"],
            "pad_id": -1,
        },
    )
    tokenizer = SentencePiece(
        model_dir=hparams["tokenizer_folder"], vocab_size=hparams["output_neurons"], model_type=hparams["token_type"]
    )
    check_tokenizer_fits(tokenizer.sp, hparams["output_neurons"], hparams["train_csv"])
    return tokenizer


def check_tokenizer_fits(sp, output_neurons, train_csv):
    """Raises BadDataError unless the tokenizer has exactly ``output_neurons`` tokens.

    More tokens would be labels outside the output layer, which torch's CTC loss takes without an
    error; fewer would be outputs that no label trains. The usual cause is a transcript character
    outside ALPHABET, which grows a character tokenizer: the error names such characters and a
    transcript that has them.
    """
    size = sp.vocab_size()
    if size == output_neurons:
        return
    fix = f"or set output_neurons: {size} and train in a new output_folder"
    outside = {}  # character -> the first utterance that has it
    for utt_id, row in read_manifest(train_csv)[0].items():
        for char in set(row["wrd"]) - set(ALPHABET + " "):
            outside.setdefault(char, (utt_id, row["wrd"]))
    if size < output_neurons or not outside:
        raise BadDataError(
            f"The tokenizer trained on {train_csv} has {size} tokens, but output_neurons is {output_neurons}: "
            f"check token_type, {fix}."
        )
    chars = sorted(outside)
    utt_id, transcript = outside[chars[0]]
    raise BadDataError(
        f"The transcripts of {train_csv} have characters outside LibriSpeech's alphabet (A-Z and '): "
        f"{', '.join(repr(char) for char in chars)}, e.g. utterance {utt_id}: {transcript!r}. "
        f"The tokenizer then has {size} tokens, more than output_neurons ({output_neurons}), and they would be "
        "labels outside the output layer. Write them out in the alphabet (e.g. 42 -> FORTY TWO) in the "
        f"transcripts and prepare the manifests again (librispeech_prepare.py normalises case, accents and "
        f"apostrophes), {fix}."
    )


def csv_name(path):
    """A data set's name: its csv file name without folder and extension."""
    return os.path.splitext(os.path.basename(path))[0]


def load_datasets(hparams, train_csv, valid_csv, test_csvs):
    """Train, valid and {name: test} datasets of the usable manifest rows (``hparams["bad_data"]``);
    training order from ``hparams["sorting"]``. With ``hparams["max_train_duration"]`` (seconds, optional)
    longer training and validation utterances are left out, as the published MADEON setup does; test
    sets are kept whole.

    Evaluation sets are sorted by duration, which makes batches with little padding.
    """

    def load(path):
        return load_manifest(path, hparams["data_folder"], hparams["bad_data"], hparams["max_duration"])

    train_data, valid_data = load(train_csv), load(valid_csv)
    max_train_duration = hparams.get("max_train_duration")
    if max_train_duration is not None:
        kept = {"key_max_value": {"duration": max_train_duration}}
        sizes = len(train_data), len(valid_data)
        train_data, valid_data = train_data.filtered_sorted(**kept), valid_data.filtered_sorted(**kept)
        logger.info(
            f"max_train_duration {max_train_duration} s left out {sizes[0] - len(train_data)} training and "
            f"{sizes[1] - len(valid_data)} validation utterances"
        )
    if hparams["sorting"] in ("ascending", "descending"):
        train_data = train_data.filtered_sorted(
            sort_key="duration", reverse=hparams["sorting"] == "descending"
        )
        hparams["train_dataloader_opts"]["shuffle"] = False
    elif hparams["sorting"] != "random":
        raise ValueError(f"sorting must be random, ascending or descending, not {hparams['sorting']!r}")
    valid_data = valid_data.filtered_sorted(sort_key="duration")
    test_datasets = {}
    for name, path in test_csvs.items():
        test_data = load(path)
        test_datasets[name] = test_data.filtered_sorted(sort_key="duration")
        test_datasets[name].manifest_size = test_data.manifest_size  # see evaluate_test_sets
    return train_data, valid_data, test_datasets


def audio_on_device(batch, device, speed_perturb=None):
    """Moves the batch to ``device``, in place and without waiting for the GPU, and returns its waveforms
    (batch, samples) and relative lengths there, speed-perturbed per utterance by ``speed_perturb`` (the
    yaml's, at training: see ``modules/training/augmentation.py``)."""
    wav_lens = batch.sig[1]  # on the CPU, as the loader made them: perturbing reads them without a wait
    batch.to(device, non_blocking=True)
    if speed_perturb is None:
        return batch.sig
    wavs, wav_lens = speed_perturb(batch.sig[0], wav_lens)
    return wavs, to_device(wav_lens, device)


def add_audio_pipeline(hparams, datasets):
    """Adds the item ``sig``: the waveform; None for unreadable audio with ``bad_data: skip`` (the loader
    drops it, see :func:`loader_options`). Speed perturbation is done on the device, see
    :func:`audio_on_device`."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return read_checked_audio(wav, hparams["sample_rate"], hparams["bad_data"])

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)


def loader_options(hparams, train_data, valid_data, length_func=lambda row: row["duration"]):
    """``fit``'s loader arguments: dynamic batches bounded by ``length_func`` when
    ``hparams["dynamic_batching"]`` (seconds of audio by default), else the yaml's loader options.
    Batches leave out the utterances whose audio could not be read (``bad_data: skip``)."""
    if not hparams["dynamic_batching"]:
        return (
            dict(hparams["train_dataloader_opts"], collate_fn=collate_readable),
            dict(hparams["valid_dataloader_opts"], collate_fn=collate_readable),
        )
    options = []
    for data, sampler_options in [
        (train_data, hparams["dynamic_batch_sampler_train"]),
        (valid_data, hparams["dynamic_batch_sampler_valid"]),
    ]:
        sampler = DynamicBatchSampler(data, length_func=length_func, **sampler_options)
        options.append(
            {
                "batch_sampler": sampler,
                "num_workers": hparams["num_workers"],
                "collate_fn": collate_readable,
                "pin_memory": torch.cuda.is_available(),  # page-locked batches: copies to the GPU run async
            }
        )
    return tuple(options)


def evaluate_test_sets(brain, hparams, test_datasets):
    """Tests each set with the averaged best checkpoints (by the brain's ``best_key``), writes
    ``wer_<set>.txt`` to the output folder and prints the WER, saying how many utterances of the set's
    manifest it leaves out (``bad_data: skip``): a WER over fewer utterances is another figure."""
    for name, test_set in test_datasets.items():
        brain.test_wer_file = os.path.join(hparams["output_folder"], f"wer_{name}.txt")
        loader_kwargs = dict(hparams["test_dataloader_opts"], collate_fn=collate_readable)
        brain.evaluate(test_set, test_loader_kwargs=loader_kwargs, **brain.best_key)
        left_out = test_set.manifest_size - len(brain.wer_metric.scores)
        note = f" ({left_out} of {test_set.manifest_size} utterances left out: bad_data: skip)" if left_out else ""
        if if_main_process():
            print(f"Test WER on {name}: {brain.test_stats['WER']:.2f} %{note}")
