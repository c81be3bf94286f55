#!/usr/bin/env python3
"""Generate the embedded demo corpus: synthetic speech in LibriSpeech layout.

The demo recipes need a tiny ASR corpus that ships with the repository, has
no licence issues and is learnable in minutes on a CPU.  This script reads
the public-domain sentences of ``demo/sentences.txt`` (see
``build_sentences.py``) and speaks them with espeak-ng and flite voices, each
"speaker" being one voice with its own speed, pitch and sox effects.  The
output mimics LibriSpeech::

    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac
    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <out>/SPEAKERS.txt

Audio is 16 kHz, mono, 16-bit FLAC with leading/trailing silence trimmed,
peak-normalised to -3 dBFS and quantised to 11 significant bits (the 5 least
significant bits of every sample are zero, which FLAC stores for free as
"wasted bits"), so that the corpus weighs about half as much per minute.
All four flite voices and most espeak-ng variants are used for train; the dev
and test speakers are espeak-ng only, with accent + variant combinations that
never occur in train, and their sentences are disjoint from the train
sentences (all their words occur in train).  The result is deterministic
given ``--seed``.

Usage:
    python demo/make_corpus.py                       # writes demo/LibriSpeech
    python demo/make_corpus.py --verify-only         # only check an existing corpus
"""

import argparse
import collections
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
REQUIRED_TOOLS = ("espeak-ng", "flite", "sox")

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
                  "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# Variants that are unintelligible, whispered or otherwise unsuitable.
ESPEAK_SKIPPED = {"whisper", "whisperf", "Demonic", "croak", "fast"}
ESPEAK_SKIPPED_PREFIXES = ("robosoft",)
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
# Split -> (speakers, utterances per speaker, speakers that use flite).  flite
# has only four voices, so all of them go to train (several speakers each, with
# different duration_stretch / sox pitch / tempo); a held-out flite voice would
# be an unseen engine voice rather than a fair demo test speaker.
DEFAULT_LAYOUT = {"train": (100, 9, 16), "dev": (5, 12, 0), "test": (5, 20, 0)}
# Output level and resolution: peak at -3 dBFS, 11 significant bits.
PEAK_DBFS = -3.0
DROPPED_BITS = 5
# First speaker id of each split; the chapter id is speaker id * 10 + 1.
FIRST_SPEAKER_ID = {"train": 1001, "dev": 2001, "test": 3001}
# Every word of a held-out sentence must still occur at least this often in the
# sentences left for train, so that dev/test contain no out-of-vocabulary words.
MIN_TRAIN_WORD_COUNT = 3


@dataclass
class Speaker:
    speaker_id: int
    split: str
    engine: str          # "espeak-ng" or "flite"
    voice: str           # espeak "accent+variant" or flite voice name
    speed: int = 0       # espeak words per minute
    pitch: int = 0       # espeak pitch 0-99
    stretch: float = 1.0  # flite duration_stretch
    tempo: float = 1.0   # sox tempo factor
    cents: int = 0       # sox pitch shift

    @property
    def chapter_id(self):
        return self.speaker_id * 10 + 1

    def settings(self):
        if self.engine == "espeak-ng":
            synth = f"voice={self.voice} speed={self.speed} pitch={self.pitch}"
        else:
            synth = f"voice={self.voice} duration_stretch={self.stretch}"
        return f"{synth} sox: {' '.join(self.sox_effects())}"

    def sox_effects(self):
        return ["tempo", str(self.tempo), "pitch", str(self.cents)]


# ---------------------------------------------------------------- set-up ---

def check_tools():
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(f"error: missing external tool(s): {', '.join(missing)}\n"
                 "install them with: apt-get install espeak-ng flite sox")


def espeak_variants():
    """Usable variant names, read from espeak-ng-data/voices/!v."""
    roots = [Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data"),
             Path("/usr/lib/aarch64-linux-gnu/espeak-ng-data"),
             Path("/usr/share/espeak-ng-data"), Path("/usr/local/share/espeak-ng-data")]
    for root in roots:
        folder = root / "voices" / "!v"
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir() if p.is_file())
            return [n for n in names
                    if n not in ESPEAK_SKIPPED and " " not in n
                    and not n.startswith(ESPEAK_SKIPPED_PREFIXES)
                    and "robot" not in n.lower()]
    sys.exit("error: espeak-ng-data/voices/!v not found; "
             "install espeak-ng with: apt-get install espeak-ng")


def make_speakers(rng, layout):
    """Draw the speakers.

    Train: the flite speakers cycle through all four flite voices; the
    espeak-ng speakers take the shuffled variants in turn, each with the next
    accent, so that train covers (almost) every variant and every accent.
    Dev/test: espeak-ng only, each speaker an accent + variant combination that
    no train speaker uses (and no other held-out speaker).
    """
    variants = espeak_variants()
    rng.shuffle(variants)
    accents = list(ESPEAK_ACCENTS)
    rng.shuffle(accents)
    flite = list(FLITE_VOICES)
    rng.shuffle(flite)
    for split in ("dev", "test"):
        if layout[split][2]:
            sys.exit("error: flite voices are reserved for train")

    speakers, used = [], set()
    n_espeak = 0  # espeak-ng speakers drawn so far, over all splits

    def espeak_voice(split):
        nonlocal n_espeak
        variant = variants[n_espeak % len(variants)]
        n_espeak += 1
        start = n_espeak if split == "train" else n_espeak + len(accents) // 2
        taken = {v for v in used if v.endswith("+" + variant)}
        for k in range(len(accents)):
            voice = f"{accents[(start + k) % len(accents)]}+{variant}"
            if voice not in taken:
                used.add(voice)
                return voice
        return espeak_voice(split)  # every accent taken with this variant

    for split in SPLITS:
        n_spk, _, n_flite = layout[split]
        for i in range(n_spk):
            spk = Speaker(FIRST_SPEAKER_ID[split] + i, split, "", "")
            if i < n_flite:
                spk.engine = "flite"
                spk.voice = flite[i % len(flite)]
                spk.stretch = round(rng.uniform(0.8, 1.25), 2)
                spk.cents = rng.randrange(-300, 301, 10)
            else:
                spk.engine = "espeak-ng"
                spk.voice = espeak_voice(split)
                spk.speed = rng.randint(120, 200)
                spk.pitch = rng.randint(20, 80)
                spk.cents = rng.randrange(-200, 201, 10)
            spk.tempo = round(rng.uniform(0.9, 1.1), 2)
            speakers.append(spk)
    return speakers


def split_sentences(rng, sentences, layout):
    """Disjoint sentence pools; held-out sentences use no word unseen in train."""
    left = collections.Counter(w for s in set(sentences) for w in s.split())
    shuffled = sorted(set(sentences))
    rng.shuffle(shuffled)
    need = {split: layout[split][0] * layout[split][1] for split in ("dev", "test")}
    pools = {split: [] for split in SPLITS}
    for sentence in shuffled:
        words = collections.Counter(sentence.split())
        target = "train"
        if all(left[w] - n >= MIN_TRAIN_WORD_COUNT for w, n in words.items()):
            target = next((s for s in ("dev", "test") if len(pools[s]) < need[s]), "train")
        if target != "train":
            left.subtract(words)
        pools[target].append(sentence)
    return pools


def covering_order(rng, sentences):
    """Shuffle, then move first the sentences that bring a word not seen yet,
    so that a prefix of the list already covers the whole vocabulary."""
    shuffled = list(sentences)
    rng.shuffle(shuffled)
    seen, first, rest = set(), [], []
    for sentence in shuffled:
        words = set(sentence.split())
        (rest if words <= seen else first).append(sentence)
        seen |= words
    return first + rest


def assign_utterances(rng, speakers, pools, layout):
    """List of (speaker, utterance index, transcript) jobs."""
    jobs = []
    for split in SPLITS:
        pool = covering_order(rng, pools[split])
        spks = [s for s in speakers if s.split == split]
        per_spk = layout[split][1]
        if len(pool) < len(spks) * per_spk:
            sys.exit(f"error: {split} needs {len(spks) * per_spk} sentences, "
                     f"has {len(pool)}")
        used = pool[:len(spks) * per_spk]
        rng.shuffle(used)
        for k, spk in enumerate(spks):
            for j, text in enumerate(used[k * per_spk:(k + 1) * per_spk]):
                jobs.append((spk, j, text))
    return jobs


# ------------------------------------------------------------- synthesis ---

def utterance_dir(out, spk):
    return out / spk.split / str(spk.speaker_id) / str(spk.chapter_id)


def utterance_id(spk, index):
    return f"{spk.speaker_id}-{spk.chapter_id}-{index:04d}"


def spoken_text(transcript):
    """Lower-case text for the synthesisers (upper case may be spelled out)."""
    return " ".join("I" if w == "I" else w.lower() for w in transcript.split())


def sox_command(wav, out, spk):
    """Trim silence (keeping a 30 ms margin), resample, apply speaker effects.

    The output is a 32-bit float WAV; 6 dB of headroom keep the effects from
    clipping, the level is then set by ``finalize``."""
    trim = ["silence", "1", "0.05", "0.5%", "reverse"] * 2
    return ["sox", "-D", wav, "-r", str(SAMPLE_RATE), "-e", "floating-point",
            "-b", "32", "-c", "1", out, *trim, "gain", "-6", "rate", str(SAMPLE_RATE),
            *spk.sox_effects(), "pad", "0.03", "0.03"]


def finalize(audio):
    """Peak-normalise to PEAK_DBFS and round to 16-bit samples whose
    DROPPED_BITS least significant bits are zero (11 significant bits)."""
    step = 1 << DROPPED_BITS
    peak = float(np.max(np.abs(audio)))
    scale = 10 ** (PEAK_DBFS / 20) * 32768 / max(peak, 1e-9)
    samples = np.round(audio.astype(np.float64) * scale / step) * step
    return np.clip(samples, -32768, 32768 - step).astype(np.int16)


def synthesize(job):
    """Speak one utterance and write it as trimmed 16 kHz FLAC."""
    spk, index, transcript, out = job
    flac = utterance_dir(out, spk) / f"{utterance_id(spk, index)}.flac"
    text = spoken_text(transcript)
    with tempfile.TemporaryDirectory() as tmp:
        wav = str(Path(tmp) / "raw.wav")
        if spk.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", spk.voice, "-s", str(spk.speed),
                   "-p", str(spk.pitch), "-w", wav, text]
        else:
            cmd = ["flite", "-voice", spk.voice, "--setf",
                   f"duration_stretch={spk.stretch}", "-t", text, "-o", wav]
        subprocess.run(cmd, check=True, capture_output=True)
        processed = str(Path(tmp) / "processed.wav")
        subprocess.run(sox_command(wav, processed, spk), check=True, capture_output=True)
        audio, rate = sf.read(processed, dtype="float64")
    assert rate == SAMPLE_RATE and audio.ndim == 1, (rate, audio.shape)
    sf.write(str(flac), finalize(audio), SAMPLE_RATE, format="FLAC",
             subtype="PCM_16", compression_level=1.0)
    return str(flac)


def write_texts(out, speakers, jobs):
    by_speaker = collections.defaultdict(list)
    for spk, index, text in jobs:
        by_speaker[spk.speaker_id].append(f"{utterance_id(spk, index)} {text}")
    for spk in speakers:
        folder = utterance_dir(out, spk)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{spk.speaker_id}-{spk.chapter_id}.trans.txt").write_text(
            "\n".join(by_speaker[spk.speaker_id]) + "\n")
    chain = " ".join(sox_command("IN.wav", "OUT.wav", Speaker(0, "", "", "")))
    chain = chain.replace("tempo 1.0 pitch 0", "<speaker sox effects>")
    lines = ["; Synthetic demo speakers (generated by demo/make_corpus.py)",
             "; espeak-ng -v VOICE -s SPEED -p PITCH -w IN.wav TEXT  (22.05 kHz)",
             "; flite -voice VOICE --setf duration_stretch=X -t TEXT -o IN.wav  (16 kHz)",
             f"; then: {chain}",
             f"; then: peak normalised to {PEAK_DBFS:g} dBFS, rounded to 16-bit samples"
             f" with the {DROPPED_BITS} low bits zero (11 significant bits), FLAC",
             "; ID | SPLIT | ENGINE | SETTINGS"]
    lines += [f"{s.speaker_id} | {s.split} | {s.engine} | {s.settings()}"
              for s in speakers]
    (out / "SPEAKERS.txt").write_text("\n".join(lines) + "\n")


def generate(args):
    check_tools()
    rng = random.Random(args.seed)
    layout = DEFAULT_LAYOUT
    speakers = make_speakers(rng, layout)
    sentences = [l.strip() for l in args.sentences.read_text().splitlines() if l.strip()]
    pools = split_sentences(rng, sentences, layout)
    jobs = assign_utterances(rng, speakers, pools, layout)

    for split in SPLITS:  # start from a clean output: no stale files remain
        shutil.rmtree(args.out / split, ignore_errors=True)
    (args.out / "SPEAKERS.txt").unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_texts(args.out, speakers, jobs)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for n, _ in enumerate(pool.map(synthesize, [(*j, args.out) for j in jobs],
                                       chunksize=8), 1):
            if n % 100 == 0 or n == len(jobs):
                print(f"  synthesised {n}/{len(jobs)}", flush=True)


# ---------------------------------------------------------- verification ---

def read_speakers(out):
    voices = {}
    for line in (out / "SPEAKERS.txt").read_text().splitlines():
        if line.startswith(";"):
            continue
        spk, split, engine, settings = (f.strip() for f in line.split("|"))
        voice = settings.split()[0]
        voices[spk] = (split, f"{engine}:{voice}")
    return voices


def verify(out):
    """Check the corpus and print a summary; return True when it is sound."""
    errors = []
    stats = {}
    texts = {}
    step = 1 << DROPPED_BITS
    target_peak = 10 ** (PEAK_DBFS / 20) * 32768
    audio_bytes, audio_seconds = 0, 0.0
    for split in SPLITS:
        utts, durations, words = 0, [], []
        texts[split] = set()
        for trans in sorted((out / split).glob("*/*/*.trans.txt")):
            listed = set()
            for line in trans.read_text().splitlines():
                utt, _, text = line.partition(" ")
                if not text.strip():
                    errors.append(f"empty transcript: {utt}")
                listed.add(utt)
                flac = trans.parent / f"{utt}.flac"
                if not flac.is_file():
                    errors.append(f"no audio for {utt}")
                    continue
                info = sf.info(str(flac))
                if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
                    errors.append(f"bad format {flac.name}: {info}")
                audio, _ = sf.read(str(flac), dtype="int16")
                if np.any(audio % step):
                    errors.append(f"{flac.name}: samples not quantised to 11 bits")
                peak = int(np.max(np.abs(audio.astype(np.int32))))
                if abs(peak - target_peak) > step:
                    errors.append(f"{flac.name}: peak {peak} is not {PEAK_DBFS:g} dBFS")
                durations.append(len(audio) / SAMPLE_RATE)
                audio_bytes += flac.stat().st_size
                audio_seconds += len(audio) / SAMPLE_RATE
                words.append(text.split())
                texts[split].add(text)
                utts += 1
            for flac in trans.parent.glob("*.flac"):
                if flac.stem not in listed:
                    errors.append(f"no transcript for {flac.name}")
        stats[split] = (len(list((out / split).glob("*"))), utts, durations, words)

    voices = read_speakers(out)
    train_voices = {v for split, v in voices.values() if split == "train"}
    held_out = [v for s, v in voices.values() if s in ("dev", "test")]
    if len(set(held_out)) != len(held_out):
        errors.append("a voice is shared by two held-out speakers")
    for split in ("dev", "test"):
        split_voices = {v for s, v in voices.values() if s == split}
        shared = split_voices & train_voices
        if shared:
            errors.append(f"{split} voices also in train: {sorted(shared)}")
        not_espeak = sorted(v for v in split_voices if not v.startswith("espeak-ng:"))
        if not_espeak:
            errors.append(f"{split} has non-espeak-ng voices: {not_espeak}")
        if texts[split] & texts["train"]:
            errors.append(f"{split} sentences also in train: {len(texts[split] & texts['train'])}")
        train_vocab = {w for t in texts["train"] for w in t.split()}
        oov = {w for t in texts[split] for w in t.split()} - train_vocab
        if oov:
            errors.append(f"{split} words unseen in train: {sorted(oov)}")

    print(f"{'split':6} {'spk':>4} {'utts':>5} {'minutes':>8} {'vocab':>6} "
          f"{'words/utt':>9} {'sec/utt':>8}")
    for split, (n_spk, utts, durs, words) in stats.items():
        vocab = {w for ws in words for w in ws}
        print(f"{split:6} {n_spk:4d} {utts:5d} {sum(durs) / 60:8.2f} {len(vocab):6d} "
              f"{sum(map(len, words)) / max(utts, 1):9.2f} "
              f"{sum(durs) / max(utts, 1):8.2f}")
    n_train = len([v for s, v in voices.values() if s == "train"])
    by_engine = collections.Counter(v.split(":")[0] for s, v in voices.values()
                                    if s == "train")
    flite_train = sorted({v.split("=")[-1] for s, v in voices.values()
                          if s == "train" and v.startswith("flite:")})
    print(f"train speakers: {n_train} ({dict(sorted(by_engine.items()))}); "
          f"flite voices in train: {', '.join(flite_train) or 'none'}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"size of {out}: {size / 2**20:.2f} MiB "
          f"(audio: {audio_bytes / 2**20 / max(audio_seconds / 60, 1e-9):.3f} MiB per minute)")
    for e in errors[:20]:
        print("ERROR:", e)
    print("verification", "FAILED" if errors else "passed")
    return not errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=Path, default=HERE / "sentences.txt")
    parser.add_argument("--out", type=Path, default=HERE / "LibriSpeech")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--verify-only", action="store_true",
                        help="do not generate, only check an existing corpus")
    args = parser.parse_args()
    if not args.verify_only:
        generate(args)
    sys.exit(0 if verify(args.out) else 1)


if __name__ == "__main__":
    main()
