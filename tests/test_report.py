"""`mixmask report`: one self-contained HTML page of tiny synthetic runs, read back in a
real headless browser (Chromium through Playwright) and, without one, as HTML."""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mixmask.config import load_config
from mixmask.errors import MixmaskError
from mixmask.eval.protocols import run_knn
from mixmask.pictures.report import write_report
from mixmask.train.loop import pretrain

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
# Every value differs from configs/quickstart.yaml's, so exactly these keys differ from the
# recipe (out_dir, added per run, too).
OVERRIDES = ["data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
             "data.eval_test_subset=16", "data.num_workers=0", "model.width=0.125",
             "method.mocov2.proj_hidden_dim=32", "method.mocov2.queue_size=64",
             "train.batch_size=16", "train.epochs=1", "train.progress_bar=false",
             "monitor.knn=false", "monitor.online_probe=false", "eval.linear=false",
             "eval.compare_random_init=false", "train.plots=none"]
SECOND_RUN = ["method.masking=erase", "train.seed=3"]
PLOT_SIZE = (90, 60)


def override_keys(overrides):
    return {override.split("=", 1)[0] for override in overrides}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two pretrained runs of the quickstart recipe: run1 with a kNN evaluation and a plot,
    run2 with another masking; and the report of both."""
    root = tmp_path_factory.mktemp("report")
    paths = {}
    for name, extra in (("run1", []), ("run2", SECOND_RUN)):
        out_dir = root / name
        pretrain(load_config(RECIPE, [*OVERRIDES, *extra, f"out_dir={out_dir}"]))
        paths[name] = out_dir
    run_knn(paths["run1"], [])
    (paths["run1"] / "plots").mkdir(exist_ok=True)
    Image.new("RGB", PLOT_SIZE, (30, 110, 150)).save(paths["run1"] / "plots" / "loss.png")
    report = write_report([paths["run1"], paths["run2"]], root / "out" / "report.html")
    return {"root": root, "report": report, **paths}


class _Elements(HTMLParser):
    """Every element of a page as (tag, attributes, text inside it)."""

    VOID = {"img", "meta", "link", "br", "hr", "input"}

    def __init__(self, text):
        super().__init__()
        self.elements, self._open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            self.elements.append((tag, dict(attrs), ""))
        else:
            self._open.append((tag, dict(attrs), []))

    def handle_data(self, data):
        for _, _, text in self._open:
            text.append(data)

    def handle_endtag(self, tag):
        while self._open:
            open_tag, attrs, text = self._open.pop()
            self.elements.append((open_tag, attrs, "".join(text)))
            if open_tag == tag:
                break


def flat_summary(summary, prefix=""):
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(flat_summary(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def highlighted(elements):
    return {attrs["data-config-key"] for _, attrs, _ in elements
            if "data-config-key" in attrs and "changed" in attrs.get("class", "").split()}


def test_report_in_a_real_browser(runs):
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = next((path for path in ("/usr/bin/chromium", shutil.which("chromium"),
                                       shutil.which("chromium-browser")) if path
                     and Path(path).is_file()), None)
    if chromium is None:
        pytest.skip("no Chromium at /usr/bin/chromium or on PATH "
                    "(apt-get install chromium)")
    problems = []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: problems.append(message.text)
                    if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(runs["report"].resolve().as_uri(), wait_until="load")
            images = page.evaluate("""() => Promise.all([...document.images].map(
                image => image.decode().then(() => image.naturalWidth, () => 0)))""")
            plot_width = page.evaluate(
                "() => document.querySelector('img[alt=loss]').naturalWidth")
            shown = page.evaluate("""() => [...document.querySelectorAll('[data-value]')].map(
                cell => [cell.dataset.source, cell.dataset.run, cell.dataset.key,
                         cell.dataset.value, cell.dataset.protocol || null])""")
        finally:
            browser.close()
    assert problems == []
    # run1: its plot and its mask gallery; run2: its gallery.
    assert len(images) == 3 and all(width > 0 for width in images), images
    assert plot_width == PLOT_SIZE[0]
    summaries = {name: flat_summary(json.loads((runs[name] / "summary.json").read_text()))
                 for name in ("run1", "run2")}
    knn = json.loads((runs["run1"] / "eval" / "knn.json").read_text())
    seen = {"run1": set(), "run2": set()}
    for source, run, key, value, protocol in shown:
        if source == "summary":
            assert json.loads(value) == summaries[run][key], (run, key)
            seen[run].add(key)
        else:
            assert (source, run, protocol) == ("eval", "run1", "knn")
            assert json.loads(value) == knn[key], key
    for name, summary in summaries.items():
        numbers = {key for key, value in summary.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        assert numbers and numbers <= seen[name], numbers - seen[name]


def test_report_is_self_contained_marks_the_overrides_and_names_protocols(runs):
    text = runs["report"].read_text()
    elements = _Elements(text).elements
    links = [attrs[name] for _, attrs, _ in elements for name in ("src", "href")
             if name in attrs]
    assert not [link for link in links if link.startswith(("http:", "https:", "//"))]
    assert all(attrs["src"].startswith("data:image/png;base64,")
               for tag, attrs, _ in elements if tag == "img")
    assert not [tag for tag, _, _ in elements if tag == "script"]
    assert not [attrs for tag, attrs, _ in elements if tag == "link"
                and attrs.get("rel") != "icon"]

    sections = _run_sections(text)
    for name, extra in (("run1", []), ("run2", SECOND_RUN)):
        expected = override_keys(OVERRIDES) | override_keys(extra) | {"out_dir"}
        assert highlighted(_Elements(sections[f"run-{name}"]).elements) == expected, name

    eval_cells = [(attrs, inside) for _, attrs, inside in elements
                  if attrs.get("data-source") == "eval"]
    # run1's eval table (top-1, top-5) and its top-1 in the comparison table.
    assert len(eval_cells) == 3
    for attrs, inside in eval_cells:
        assert attrs["data-protocol"] == "knn" and inside.split()[-1] == "knn"
    comparison = [inside for tag, attrs, inside in elements
                  if tag == "th" and "knn eval" in inside]
    assert comparison, "the comparison table names the protocol of its top-1 column"
    assert "Comparison of 2 runs" in text


def _run_sections(text):
    """{section id: the HTML of that run's section}."""
    pieces = text.split('<section class="run" id="')[1:]
    return {piece.split('"', 1)[0]: piece.split("</section>", 1)[0] for piece in pieces}


def test_unloadable_recipe_missing_recipe_and_missing_data_are_said_on_the_page(runs):
    root = runs["root"] / "copies"
    copies = {}
    for name in ("no_recipe_file", "no_recipe_yaml", "no_data"):
        copies[name] = root / name
        copies[name].mkdir(parents=True)
        for item in ("config.yaml", "recipe.yaml", "summary.json"):
            shutil.copy(runs["run1"] / item, copies[name] / item)
    provenance = yaml.safe_load((copies["no_recipe_file"] / "recipe.yaml").read_text())
    provenance["recipe"] = str(root / "gone.yaml")
    (copies["no_recipe_file"] / "recipe.yaml").write_text(yaml.safe_dump(provenance))
    (copies["no_recipe_yaml"] / "recipe.yaml").unlink()
    config = yaml.safe_load((copies["no_data"] / "config.yaml").read_text())
    config["data"].update(dataset="cifar10", root=str(root / "no_such_folder"), download=True)
    (copies["no_data"] / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    for name, path in copies.items():
        report = write_report([path], root / f"{name}.html")
        text = report.read_text()
        marked = highlighted(_Elements(text).elements)
        if name == "no_recipe_file":
            assert "cannot be loaded here" in text and "gone.yaml" in text
            assert marked == override_keys(OVERRIDES) | {"out_dir"}
        elif name == "no_recipe_yaml":
            assert "No recipe.yaml" in text and marked == set()
        else:
            # Back to the recipe's dataset (and download); data.root now differs from it.
            assert marked == override_keys(OVERRIDES) - {"data.dataset"} | {"out_dir",
                                                                              "data.root"}
            assert "Mask gallery</h3><p class=\"note\">Not drawn: " in text
            assert not (root / "no_such_folder").exists()  # nothing was downloaded
        assert "No evaluation in eval/*.json" in text and "No plots in plots/" in text


def test_a_folder_that_is_not_a_run_is_a_mixmask_error(tmp_path):
    with pytest.raises(MixmaskError, match=r"is not a run folder \(no config.yaml\)"):
        write_report([tmp_path], tmp_path / "report.html")
    with pytest.raises(MixmaskError, match="is not a run folder"):
        write_report([tmp_path / "missing"], tmp_path / "report.html")
    with pytest.raises(MixmaskError, match="at least one run"):
        write_report([], tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()
