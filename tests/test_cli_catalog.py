"""`nezha catalog push|status|add|remove` against a real redis-server: one config dataclass per action,
the same flags as ever, and errors as one line (`nezha catalog ACTION: error: ...`), never a stack trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redis_fixtures import RedisServer, redis_server  # noqa: F401

from nezha.catalog import Catalog
from nezha.cli.catalog import CatalogAddConfig, CatalogPushConfig, CatalogRemoveConfig, CatalogStatusConfig
from nezha.config import ConfigError
from nezha.live_catalog import REDIS_URL_ENV, codes_of


@pytest.fixture(scope="module")
def catalog(tiny_prepared: Path) -> Catalog:
    return Catalog.load(tiny_prepared / "catalog")


def free_ids(used: set[int], sizes: tuple[int, ...], n: int) -> list[int]:
    return [p for p in range(int(np.prod(sizes))) if p not in used][:n]


def test_cli_push_status_add_remove(redis_server: RedisServer, tiny_prepared: Path, tmp_path: Path,  # noqa: F811
                                    capsys: pytest.CaptureFixture[str], catalog: Catalog) -> None:
    from nezha.cli import main

    checkpoint = tmp_path / "ckpt"
    (checkpoint / "catalog").mkdir(parents=True)
    catalog.save(checkpoint / "catalog")
    url = ["--redis-url", redis_server.url]
    assert main(["catalog", "push", "--checkpoint", str(checkpoint), *url]) == 0
    assert "version 1" in capsys.readouterr().out
    assert main(["catalog", "push", "--checkpoint", str(checkpoint), "--if-empty", *url]) == 0
    assert "left unchanged" in capsys.readouterr().out
    new_id = free_ids(set(catalog.packed.tolist()), catalog.codebook_sizes, 1)[0]
    codes = ",".join(str(c) for c in codes_of(new_id, catalog.codebook_sizes))
    assert main(["catalog", "add", "--item-id", "CLI-1", "--codes", codes, *url]) == 0
    assert f"({new_id})" in capsys.readouterr().out
    assert main(["catalog", "add", "--item-id", "CLI-2", "--text", "Acme shampoo",
                 "--quantizer", str(tiny_prepared / "quantizer.safetensors"), *url]) == 0
    assert "added CLI-2" in capsys.readouterr().out
    assert main(["catalog", "remove", "CLI-1", *url]) == 0
    assert main(["catalog", "status", *url]) == 0
    out = capsys.readouterr().out
    assert '"version": 4' in out and f'"size": {catalog.num_items + 1}' in out
    with pytest.raises(SystemExit, match="not in the catalog"):
        main(["catalog", "remove", "CLI-1", *url])


def test_cli_config_errors_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    url = {"redis_url": "redis://127.0.0.1:1/0"}
    cases = [(CatalogStatusConfig, {}, "redis_url"), (CatalogPushConfig, url, "checkpoint"),
             (CatalogAddConfig, url, "item_id"), (CatalogAddConfig, {**url, "codes": [1, 2, 3]}, "item_id"),
             (CatalogRemoveConfig, url, "item_ids"), (CatalogStatusConfig, {**url, "feed_maxlen": 0}, "feed_maxlen")]
    for cls, values, field in cases:
        with pytest.raises(ConfigError, match=f"^{field}: "):
            cls(**values)
    monkeypatch.setenv(REDIS_URL_ENV, "redis://127.0.0.1:2/0")
    assert CatalogStatusConfig().redis_url == "redis://127.0.0.1:2/0"  # the environment fills it in
    assert CatalogAddConfig(item_id="X", codes=[1, 2, 3]).codes == [1, 2, 3]


def test_cli_errors_are_one_line_per_action(redis_server: RedisServer, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from nezha.cli import main

    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    url = ["--redis-url", redis_server.url]
    with pytest.raises(SystemExit, match=r"^nezha catalog status: error: redis_url: .*NEZHA_REDIS_URL"):
        main(["catalog", "status"])
    with pytest.raises(SystemExit, match=r"^nezha catalog push: error: checkpoint: required"):
        main(["catalog", "push", *url])
    with pytest.raises(SystemExit, match=r"^nezha catalog add: error: item_id: nothing to add"):
        main(["catalog", "add", *url])
    with pytest.raises(SystemExit, match=r"^nezha catalog add: error: codes: expected int"):
        main(["catalog", "add", "--item-id", "X", "--codes", "1,x,3", *url])
    with pytest.raises(SystemExit, match=r"^nezha catalog remove: error: item_ids: "):
        main(["catalog", "remove", *url])
    with pytest.raises(SystemExit, match=r"^nezha catalog remove: error: .*holds no catalog"):
        main(["catalog", "remove", "A", *url])  # nothing pushed yet
    with pytest.raises(SystemExit, match=r"^nezha catalog add: error: .*holds no catalog"):
        main(["catalog", "add", "--item-id", "X", "--codes", "1,2,3", *url])


def test_cli_takes_a_config_file_and_item_ids_as_flags(redis_server: RedisServer, tmp_path: Path,  # noqa: F811
                                                       capsys: pytest.CaptureFixture[str], catalog: Catalog) -> None:
    from nezha.cli import main

    checkpoint = tmp_path / "ckpt"
    catalog.save(checkpoint / "catalog")
    config = tmp_path / "catalog.yaml"
    config.write_text(f"redis_url: {redis_server.url}\nprefix: test:cfg\ncheckpoint: {checkpoint}\n")
    assert main(["catalog", "push", "--config", str(config)]) == 0
    assert "under 'test:cfg': version 1" in capsys.readouterr().out
    config.write_text(f"redis_url: {redis_server.url}\nprefix: test:cfg\n")
    first, second = catalog.item_ids[:2]
    assert main(["catalog", "remove", "--config", str(config), "--item-ids", first, second]) == 0
    assert "removed 2 item(s); catalog version 2" in capsys.readouterr().out
    assert main(["catalog", "status", "--config", str(config)]) == 0
    assert f'"size": {catalog.num_items - 2}' in capsys.readouterr().out
