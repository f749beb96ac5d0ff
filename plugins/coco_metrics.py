"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and optionally SPICE).

The COCO caption evaluation protocol, run through the ``pycocoevalcap`` package (the
``eval`` extra): candidates and references are lower-cased and tokenized by the Stanford
PTB tokenizer with punctuation dropped, then scored by the protocol's scorers, unchanged.
BLEU (closest reference length) and METEOR are corpus-level: their statistics are pooled
over images. ROUGE-L (beta 1.2), CIDEr (the CIDEr-D variant: clipped n-gram counts,
Gaussian length penalty, times 10) and SPICE are means over images. CIDEr's idf comes from
the references of the images being evaluated, so the numbers are comparable only on the
same image set (e.g. the 5,000 Karpathy test images); on a single image every idf is zero
and so is CIDEr.

The tokenizer, METEOR and SPICE are Java programs (bundled jars); SPICE also downloads
Stanford CoreNLP models (about 1 GB) on first use, so it is off by default.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.evaluation import CaptionSet, Metric

_WHO = "CocoMetrics"


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace made one space.

    The PTB tokenizer is fed one caption per line and its output lines are matched back by
    position, so a caption must not contain anything Java reads as a line break (``\\r``,
    ``\\u2028``, ...): one would shift every later caption onto the wrong image.
    """
    return " ".join(text.split())


class CocoMetrics:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of captions against their references.

    The scorers are those of the COCO caption evaluation (``pycocoevalcap``), used as the
    protocol prescribes; the flags only choose which to run. Metrics: ``bleu1`` ..
    ``bleu4``, ``meteor``, ``rouge_l``, ``cider``, ``spice``, each for its flag. An empty
    caption scores zero. Needs Java; METEOR's Java process starts here, so that it loads
    while the captions are generated.

    Args:
        bleu: BLEU-1..4.
        meteor: METEOR 1.5 (English, normalised, with paraphrases).
        rouge: ROUGE-L.
        cider: CIDEr-D.
        spice: SPICE; downloads Stanford CoreNLP models on first use [ours: off].
    """

    def __init__(self, bleu: bool = True, meteor: bool = True, rouge: bool = True,
                 cider: bool = True, spice: bool = False) -> None:
        try:
            from pycocoevalcap.bleu.bleu import Bleu
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.meteor.meteor import Meteor
            from pycocoevalcap.rouge.rouge import Rouge
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        except ImportError as e:
            raise ConfigError(f"evaluator {_WHO} needs the pycocoevalcap package: "
                              f"pip install 'vlrm[eval]' ({e})") from e
        if shutil.which("java") is None:
            raise ConfigError(f"evaluator {_WHO} needs Java on the PATH (the COCO tokenizer "
                              "and METEOR are Java programs): install a Java runtime, e.g. "
                              "apt-get install default-jre-headless")
        if not (bleu or meteor or rouge or cider or spice):
            raise ConfigError(f"evaluator {_WHO}: every metric is turned off")
        self.tokenizer = PTBTokenizer()
        self.bleu = Bleu(4) if bleu else None
        self.meteor = Meteor() if meteor else None
        self.rouge = Rouge() if rouge else None
        self.cider = Cider() if cider else None
        self.spice = self._make_spice() if spice else None

    @staticmethod
    def _make_spice() -> Any:
        from pycocoevalcap.spice.spice import Spice

        try:
            # Its download progress goes to stdout; keep stdout for results.
            with contextlib.redirect_stdout(sys.stderr):
                return Spice()
        except OSError as e:
            raise ConfigError(f"evaluator {_WHO}: SPICE needs the Stanford CoreNLP 3.6.0 "
                              "models, downloaded on first use from nlp.stanford.edu, and the "
                              f"download failed ({e}); turn spice off or run once with "
                              "internet access") from e

    def _tokenize(self, captions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
        """PTB-tokenize candidates and references in one Java run; keys are positions."""
        table: dict[tuple[str, int], list[dict[str, str]]] = {}
        for i, (caption, refs) in enumerate(zip(captions, references)):
            table[("c", i)] = [{"caption": _one_line(caption)}]
            table[("r", i)] = [{"caption": _one_line(r)} for r in refs]
        tokens = self.tokenizer.tokenize(table)
        if any(len(tokens.get(k, ())) != len(v) for k, v in table.items()):
            raise RuntimeError(f"{_WHO}: the PTB tokenizer returned a different number of "
                               "lines than it was given")
        res = {i: tokens[("c", i)] for i in range(len(captions))}
        gts = {i: tokens[("r", i)] for i in range(len(captions))}
        return res, gts

    def _meteor(self, gts: dict, res: dict) -> float:
        try:
            return float(self.meteor.compute_score(gts, res)[0])
        except (ValueError, OSError) as e:
            # The Java process died or answered garbage. pycocoevalcap keeps its lock held
            # on error, and its __del__ would then wait on that lock forever: free it.
            if self.meteor.lock.locked():
                self.meteor.lock.release()
            code = self.meteor.meteor_p.poll()
            raise RuntimeError(f"{_WHO}: METEOR's Java process failed (exit code {code}): "
                               f"{e}") from e

    def __call__(self, captions: CaptionSet) -> Mapping[str, Metric]:
        references = captions.require_references(_WHO)
        if len(captions) == 0:
            raise ConfigError(f"evaluator {_WHO}: there are no captions to score")
        for image_id, refs in zip(captions.image_ids, references):
            if len(refs) == 0:
                raise ConfigError(f"evaluator {_WHO}: image {image_id} has no reference "
                                  "captions")
        out: dict[str, Metric] = {}
        with contextlib.redirect_stdout(sys.stderr):
            res, gts = self._tokenize(captions.captions, references)
            if self.bleu is not None:
                scores, _ = self.bleu.compute_score(gts, res, verbose=0)
                out.update({f"bleu{n}": float(s) for n, s in enumerate(scores, start=1)})
            if self.meteor is not None:
                out["meteor"] = self._meteor(gts, res)
            if self.rouge is not None:
                out["rouge_l"] = float(self.rouge.compute_score(gts, res)[0])
            if self.cider is not None:
                out["cider"] = float(self.cider.compute_score(gts, res)[0])
            if self.spice is not None:
                out["spice"] = float(self.spice.compute_score(gts, res)[0])
        return out


@hookimpl
def vlrm_register_evaluators() -> dict[str, Any]:
    return {"coco_metrics": CocoMetrics}
