"""The larger offline corpus: installed packages' pydoc pages (dewey_lab.data.pydoc), held out by
package, with evaluation-only text refused by name and dropped by content (dewey_lab.data.decontaminate).

References written here: the module tree of a package laid out on disk by this test, the span count
computed by slicing token lists (no hashing), and the package hold-out read off the document ids."""

import subprocess
import sys
import textwrap

import pytest

from dewey_lab.data.corpus import Document
from dewey_lab.data.decontaminate import SPAN, sharing
from dewey_lab.data.pydoc import EVAL_PACKAGES, PydocCorpus, installed_packages
from dewey_lab.data.windows import WindowConfig, Windower


def test_evaluation_only_packages_are_refused_by_name(tmp_path):
    assert EVAL_PACKAGES == ("networkx",)
    assert "networkx" not in installed_packages() and "dewey_lab" not in installed_packages()
    assert {"numpy", "torch", "transformers"} <= set(installed_packages())
    for kwargs in ({"packages": ["numpy", "networkx"]}, {"modules": ["json", "networkx.algorithms"]}):
        with pytest.raises(ValueError, match="networkx is evaluation-only text") as err:
            PydocCorpus(str(tmp_path / "c.jsonl"), **kwargs)
        assert "\n" not in str(err.value) and "remove it from data.corpus" in str(err.value)
    with pytest.raises(ValueError, match="packages must be 'installed'"):
        PydocCorpus(str(tmp_path / "c.jsonl"), packages="all")


def test_package_modules_walks_public_modules_shallowest_first(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/b.py": "", "pkg/a.py": "", "pkg/_private.py": "",
             "pkg/tests/__init__.py": "", "pkg/tests/test_x.py": "", "pkg/sub/__init__.py": "",
             "pkg/sub/c.py": "", "pkg/sub/_hidden/__init__.py": "", "pkg/sub/_hidden/d.py": "",
             "pkg/_inner/__init__.py": "", "pkg/_inner/e.py": ""}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from dewey_lab.data.pydoc import package_modules
        print(package_modules("pkg", 100)); print(package_modules("pkg", 3)); print(package_modules("nope", 5))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['pkg', 'pkg.a', 'pkg.b', 'pkg.sub', 'pkg.sub.c']", "['pkg', 'pkg.a', 'pkg.b']", "[]"]


def test_package_pages_build_after_the_standard_library(tmp_path):
    path = tmp_path / "c.jsonl"
    docs = list(PydocCorpus(str(path), modules=["colorsys"], packages=["omegaconf"],
                            max_modules_per_package=4).documents())
    ids = [d.doc_id for d in docs]
    assert ids[0] == "colorsys" and ids[1] == "omegaconf" and len(ids) == 5
    assert all(i.split(".")[0] == "omegaconf" for i in ids[1:])
    assert docs[1].text.startswith("Python Library Documentation: package omegaconf")
    with pytest.raises(ValueError, match="holds the package page 'omegaconf' but packages is null"):
        list(PydocCorpus(str(path), modules=["colorsys"]).documents())
    assert PydocCorpus(str(path), modules=["colorsys"], packages=["omegaconf"], max_modules_per_package=4
                       ).fingerprint() != PydocCorpus(str(tmp_path / "d.jsonl"), modules=["colorsys"]).fingerprint()


def test_sharing_counts_runs_of_span_tokens(tokenizer):
    reference = " ".join(f"word{i}" for i in range(400))
    ref_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    vocab = tokenizer.convert_ids_to_tokens
    quote = lambda a, b: tokenizer.convert_tokens_to_string(vocab(ref_ids[a:b]))
    pages = {"copies 60": "intro text here. " + quote(100, 160) + " and then more of its own.",
             "copies 49": "intro text here. " + quote(100, 149) + " and then more of its own.",
             "own": "a page of its own words, nothing taken from anywhere else at all."}
    for doc_id, text in pages.items():  # the reference count: every SPAN-token slice of the page, by hand
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ref = {tuple(ref_ids[i:i + SPAN]) for i in range(len(ref_ids) - SPAN + 1)}
        by_hand = sum(tuple(ids[i:i + SPAN]) in ref for i in range(len(ids) - SPAN + 1))
        assert sharing({doc_id: text}, [reference], tokenizer).get(doc_id, 0) == by_hand
    assert sharing(pages, [reference], tokenizer) == {"copies 60": 11}


def test_val_by_package_holds_out_whole_packages():
    docs = [Document(f"pkg{p}.mod{m}", "x") for p in range(300) for m in range(4)]
    by_package = Windower(WindowConfig(val_fraction=0.1, val_by="package"), None, "t")
    by_document = Windower(WindowConfig(val_fraction=0.1), None, "t")
    held = {}
    for doc in docs:
        held.setdefault(doc.doc_id.split(".")[0], set()).add(by_package.is_val(doc))
    assert all(len(v) == 1 for v in held.values())  # every package all in or all out
    share = sum(v == {True} for v in held.values()) / len(held)
    assert 0.05 < share < 0.15
    split = {}
    for doc in docs:  # by document, packages are split (the old rule: a page is held out on its own)
        split.setdefault(doc.doc_id.split(".")[0], set()).add(by_document.is_val(doc))
    assert any(len(v) == 2 for v in split.values())


def test_counting_shared_hashes_matches_numpy_isin():
    """The build's binary search over the sorted reference hashes counts what ``np.isin`` counts."""
    import numpy as np

    from dewey_lab.data.decontaminate import _count_in

    rng = np.random.default_rng(7)
    ref = np.unique(rng.integers(0, 2**63, 500, dtype=np.uint64))
    for values in (rng.integers(0, 2**63, 300, dtype=np.uint64), np.concatenate([ref[::3], ref[-1:], ref[:1]]),
                   np.zeros(0, dtype=np.uint64), np.asarray([2**64 - 1, 0], dtype=np.uint64)):
        assert _count_in(values, ref) == int(np.isin(values, ref).sum())
    assert _count_in(ref, np.zeros(0, dtype=np.uint64)) == 0
