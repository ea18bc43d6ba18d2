"""Speech synthesis with eSpeak NG, loaded from the ``espeakng-loader`` wheel through ctypes.

Why eSpeak: it ships as a pip wheel (no system package, no model download), speaks at well over
100x real time on one CPU core and is clearly intelligible, which is all a demo ASR/S2S task needs.

Why a helper process: libespeak-ng carries hidden state from one utterance into the next (pitch
flutter index, glottal phase, rand() state), so the same request gives slightly different audio
depending on what was spoken before, and in which process. To make audio a pure function of
(text, style), a small server process (this file run as a script: ctypes only, so forking is cheap)
initialises eSpeak once and forks a child per utterance, which speaks from that pristine state.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import multiprocessing as mp
import os
import random
import struct
import subprocess
import sys
import threading
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported lazily: the server process stays small, so forks stay fast
    import numpy as np

SAMPLE_RATE = 22050  # eSpeak NG's native output rate.

# English voices shipped in the loader's espeak-ng-data, combined with voice variants (!v/...).
# Chosen for intelligibility: en-029 and en-gb-x-gb* dialect voices and the novelty variants are out.
BASE_VOICES: tuple[str, ...] = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc")
VARIANTS: tuple[str, ...] = ("", "+m1", "+m3", "+m7", "+f1", "+f3", "+f4")
RATE_RANGE = (140, 190)  # words per minute
PITCH_RANGE = (30, 70)  # eSpeak pitch 0-100
WORD_GAP_RANGE = (0, 6)  # extra pause between words, in 10 ms units: varies the speaking style

# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_espeakRATE, _espeakVOLUME, _espeakPITCH, _espeakWORDGAP = 1, 2, 3, 7
_espeakCHARS_UTF8 = 1
_POS_CHARACTER = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
# Server reply status codes.
_OK, _FAILED, _UNKNOWN_VOICE = 0, 1, 3
_REPLY_HEADER = struct.Struct("<iI")  # status, number of PCM bytes


@dataclass(frozen=True)
class VoiceStyle:
    """One speaker: an eSpeak voice name, speaking rate (wpm), pitch (0-100), word gap (10 ms)."""

    voice: str
    rate: int
    pitch: int
    word_gap: int = 0

    @property
    def name(self) -> str:
        """Speaker id safe for cut ids and file names (no dots, no '+')."""
        voice = self.voice.replace("+", "-").replace(".", "_")
        return f"{voice}-r{self.rate}-p{self.pitch}-g{self.word_gap}"


def all_voices() -> list[str]:
    """Every base voice x variant combination used by the demo."""
    return [b + v for b in BASE_VOICES for v in VARIANTS]


# Voices no training split uses: other variants of the same base voices, with a pitch outside PITCH_RANGE. The
# demo's `test_new_voice` split and its WAVs are spoken by them, to show a model hearing a new speaker.
NEW_VOICE_VARIANTS: tuple[str, ...] = ("+m2", "+m4", "+m5", "+m6", "+f2", "+f5")


def sample_new_voice_style(rng: random.Random) -> VoiceStyle:
    """A speaker the training splits never have (see NEW_VOICE_VARIANTS)."""
    low, high = PITCH_RANGE
    return VoiceStyle(
        voice=rng.choice(BASE_VOICES) + rng.choice(NEW_VOICE_VARIANTS),
        rate=rng.randint(*RATE_RANGE),
        pitch=rng.choice([rng.randint(low - 15, low - 1), rng.randint(high + 1, high + 15)]),
        word_gap=rng.randint(*WORD_GAP_RANGE),
    )


def sample_style(rng: random.Random) -> VoiceStyle:
    """Draw a speaker: voice, rate, pitch and word gap, from ranges tuned for intelligibility."""
    return VoiceStyle(
        voice=rng.choice(all_voices()),
        rate=rng.randint(*RATE_RANGE),
        pitch=rng.randint(*PITCH_RANGE),
        word_gap=rng.randint(*WORD_GAP_RANGE),
    )


# ----------------------------------------------------------------------------------------------
# Inside the server process: libespeak-ng through ctypes
# ----------------------------------------------------------------------------------------------


class _UnknownVoice(Exception):
    pass


class _Espeak:
    """libespeak-ng in synchronous mode; one per process (the library is a singleton)."""

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_path = espeakng_loader.get_data_path()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if rate != SAMPLE_RATE:
            raise RuntimeError(
                f"libespeak-ng at {espeakng_loader.get_library_path()} failed to initialise with data "
                f"{data_path} (returned {rate}); reinstall espeakng-loader"
            )
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._chunks: list[bytes] = []
        # Keep a reference: ctypes callbacks are freed when the Python object is collected.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0  # 0 = continue synthesis

    def load_voice(self, voice: str) -> None:
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise _UnknownVoice(voice)

    def speak(self, text: str, voice: str, rate: int, pitch: int, word_gap: int) -> bytes:
        """int16 PCM at 22050 Hz."""
        lib = self._lib
        # Noise sources (breath, fricatives) draw from libc rand() and eSpeak's own generator;
        # seed both from the request so the noise is part of the function too.
        seed = zlib.crc32(f"{text}|{voice}|{rate}|{pitch}|{word_gap}".encode())
        self._libc.srand(seed)
        lib.espeak_ng_SetRandSeed(seed)
        self.load_voice(voice)
        lib.espeak_SetParameter(_espeakRATE, rate, 0)
        lib.espeak_SetParameter(_espeakPITCH, pitch, 0)
        lib.espeak_SetParameter(_espeakWORDGAP, word_gap, 0)
        lib.espeak_SetParameter(_espeakVOLUME, 100, 0)
        self._chunks = []
        data = text.encode() + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _espeakCHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err} for text {text!r}")
        return b"".join(self._chunks)


def _speak_in_child(engine: _Espeak, request: dict) -> tuple[int, bytes]:
    """Run one request in a forked child so the engine's state never advances."""
    if not hasattr(os, "fork"):  # no fork (Windows): correct audio, but not bit-reproducible
        try:
            return _OK, engine.speak(**request)
        except _UnknownVoice:
            return _UNKNOWN_VOICE, b""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: speak, send PCM, exit without running any Python cleanup
        code = _FAILED
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(engine.speak(**request))
            code = _OK
        except _UnknownVoice:
            code = _UNKNOWN_VOICE
        except BaseException:
            traceback.print_exc()  # the server's stderr is the caller's: the cause stays visible
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        pcm = pipe.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, pcm if code == _OK else b""


def _serve() -> None:
    """Server loop: one JSON request per stdin line, a header + PCM reply per request on stdout."""
    engine = _Espeak()
    # Loading a voice once here (never speaking) leaves English dictionaries and phoneme tables in
    # memory for every child, halving the per-utterance cost; the state stays the same for all.
    engine.load_voice(BASE_VOICES[0])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        code, pcm = _speak_in_child(engine, json.loads(line))
        stdout.write(_REPLY_HEADER.pack(code, len(pcm)))
        stdout.write(pcm)
        stdout.flush()


# ----------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------


class EspeakEngine:
    """Client of a private eSpeak server process; thread-safe, one per process is plenty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        atexit.register(self.close)

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # Run this file as a script, not as a module: the server must not import the package
            # (numpy, torch) or its forks get slow. -P keeps this folder off sys.path.
            self._proc = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        return self._proc

    def synthesize(self, text: str, style: VoiceStyle) -> np.ndarray:
        """Speak ``text`` in ``style``; float32 mono at 22050 Hz, edge silence trimmed."""
        import numpy as np

        request = json.dumps({"text": text, **asdict(style)}).encode() + b"\n"
        with self._lock:
            proc = self._server()
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
                header = proc.stdout.read(_REPLY_HEADER.size)
                code, size = _REPLY_HEADER.unpack(header)
                pcm = proc.stdout.read(size)
                if len(pcm) != size:
                    raise BrokenPipeError(f"reply cut short: {len(pcm)} of {size} bytes")
            except (BrokenPipeError, struct.error) as err:
                self.close()
                raise RuntimeError(
                    f"the eSpeak server process died while speaking {text!r} ({err}); "
                    "check that espeakng-loader is installed in this Python environment"
                ) from err
        if code == _UNKNOWN_VOICE:
            raise ValueError(
                f"eSpeak voice {style.voice!r} not found in the espeakng-loader data; use one of {all_voices()}"
            )
        if code != _OK:
            raise RuntimeError(f"eSpeak failed (code {code}) on {text!r} with voice {style.voice!r}")
        return trim_silence(np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0)

    def close(self) -> None:
        """Stop the server (it also exits by itself when this process dies and its stdin closes)."""
        if self._proc is not None and os.getpid() == self._owner:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
            self._proc.stdout.close()
        self._proc = None


def trim_silence(audio: np.ndarray, threshold: float = 1e-3, pad_s: float = 0.05) -> np.ndarray:
    """Cut eSpeak's leading/trailing silence, keeping ``pad_s`` so onsets are not clipped."""
    import numpy as np

    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio
    pad = int(pad_s * SAMPLE_RATE)
    return audio[max(0, loud[0] - pad) : loud[-1] + 1 + pad]


_ENGINE: EspeakEngine | None = None


def get_engine() -> EspeakEngine:
    """The process-wide engine (a forked process gets its own server, never its parent's)."""
    global _ENGINE
    if _ENGINE is None or os.getpid() != _ENGINE._owner:
        _ENGINE = EspeakEngine()
    return _ENGINE


def synthesize(text: str, style: VoiceStyle) -> np.ndarray:
    """Speak ``text``; float32 mono at 22050 Hz. The same (text, style) always gives the same audio."""
    return get_engine().synthesize(text, style)


def worker_pool(num_workers: int, preload: Sequence[str] = (__name__,)):
    """A process pool for synthesis work; each worker starts its own eSpeak server on first use.

    forkserver rather than fork: callers (tests, Ray drivers) may already run threads, and
    forking a threaded process can deadlock. Preloading the worker modules (instead of the
    default ``__main__``) keeps worker start-up fast and never re-runs the caller's script.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn").Pool(num_workers)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx.Pool(num_workers)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
