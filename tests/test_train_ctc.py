"""End-to-end check of train_CTC.py: a tiny ConMamba trained on a slice of the demo corpus.

The run prepares the data, trains the tokenizer, trains a few epochs, averages the best
checkpoints and decodes the test slice; the training loss must fall and the WER file must exist.
"""

import re

from recipe_runs import run_tiny_ctc, train_losses


def test_tiny_training_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = run_tiny_ctc(
        out,
        "--select_n_sentences=[32, 8, 8]",
        "--number_of_epochs=12",
        "--n_warmup_steps=10",
        "--max_batch_length_train=8",
        "--lr_adam=0.005",
        # No augmentation: the model should fit the slice quickly.
        "--num_fea_augmentations=0",
        "--speed_changes=[100]",
    )

    losses = train_losses(out / "train_log.txt")
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0], losses

    wer_file = out / "wer_test.txt"
    assert wer_file.is_file()
    assert "%WER" in wer_file.read_text(encoding="utf-8")
    assert re.search(r"Test WER on test: [0-9.]+ %", proc.stdout), proc.stdout[-2000:]

    # A normal run is quiet: no SentencePiece trainer dump, no size mismatch between the tokenizer
    # and the output layer, no warning about the optional torchvision, the word LM's ARPA format or
    # small vocabulary, or torch.jit.script's deprecation (only an export scripts)
    printed = proc.stdout + proc.stderr
    noises = ("trainer_interface", "vocab size", "Vocab size mismatch", "torchvision", "Using arpa instead",
              "unigrams passed as vocabulary", "torch.jit.script")
    for noise in noises:
        assert noise not in printed, printed[-3000:]
