"""The run's configuration from the org's metadata (issue 11): labels from option sets with YAML overrides,
the sync-filter column dropped where the table lacks it, and mirrored labels following a rename."""

from __future__ import annotations

import duckdb

from sync_pipeline.config.model import load_config
from sync_pipeline.engine import normalize, orgmeta
from sync_pipeline.engine.extract import dynamics as dynamics_extract
from sync_pipeline.engine.store.state import ensure_schema, get_cursor


def _meta(labels: dict[int, str], with_filter: bool = True) -> orgmeta.OrgMetadata:
    attrs = {"leadsourcecode": orgmeta.Attribute("leadsourcecode", "Picklist", options=labels)}
    if with_filter:
        attrs["new_synctomkto"] = orgmeta.Attribute("new_synctomkto", "Boolean")
    return orgmeta.OrgMetadata({"lead": orgmeta.TableMeta("lead", "leads", attributes=attrs)}, {})


def _field(config, name: str):  # noqa: ANN001, ANN202
    return next(f for f in config.entity("lead").all_fields if f.marketo == name)


def test_labels_come_from_the_org_and_the_yaml_overrides_single_codes() -> None:
    config = load_config()
    assert _field(config, "leadSource").options is None
    run = orgmeta.runtime_config(config, _meta({1: "Advertisement", 8: "Web"}))
    assert _field(run, "leadSource").options == {1: "Advertisement", 8: "Web"}
    assert run.entity("lead").sync_filter_column == "new_synctomkto"
    lead = config.entity("lead")
    fields = [
        f.model_copy(update={"options": {8: "Website (ours)"}}) if f.marketo == "leadSource" else f
        for f in lead.extra_fields
    ]
    custom = type(config)(
        sync=config.sync,
        entities=[
            lead.model_copy(update={"extra_fields": fields}) if e.name == "lead" else e
            for e in config.entities
        ],
    )
    run = orgmeta.runtime_config(custom, _meta({1: "Advertisement", 8: "Web"}))
    assert _field(run, "leadSource").options == {1: "Advertisement", 8: "Website (ours)"}


def test_a_table_without_the_filter_column_syncs_everything() -> None:
    run = orgmeta.runtime_config(load_config(), _meta({8: "Web"}, with_filter=False))
    assert run.entity("lead").sync_filter_column is None
    assert "new_synctomkto" not in dynamics_extract.dynamics_select(run.entity("lead"))
    assert run.entity("contact").sync_filter_column == "new_synctomkto"  # a table the metadata did not cover


def test_a_renamed_label_rewrites_the_mirror_and_marks_the_rows_pending() -> None:
    config = load_config()
    con = duckdb.connect()
    ensure_schema(con, config)
    con.execute(
        """INSERT INTO d_lead (id, version, deleted, f_leadSource) VALUES
                   ('a', 1, false, 'Web'), ('b', 1, false, 'Seminar'), ('c', 1, false, ?)""",
        [normalize.INVALID + "11"],
    )
    first = orgmeta.runtime_config(config, _meta({6: "Seminar", 8: "Web"})).entity("lead")
    assert dynamics_extract.relabel_options(con, first) == 0  # the first run only remembers the labels
    assert get_cursor(con, "optionsets:lead:leadSource")
    renamed = orgmeta.runtime_config(
        config, _meta({6: "Seminar", 8: "Website", 11: "Partner Portal"})
    ).entity("lead")
    assert dynamics_extract.relabel_options(con, renamed) == 2
    rows = con.execute("SELECT id, f_leadSource, pending_seq IS NOT NULL FROM d_lead ORDER BY id").fetchall()
    assert rows == [("a", "Website", True), ("b", "Seminar", False), ("c", "Partner Portal", True)]
    assert dynamics_extract.relabel_options(con, renamed) == 0  # nothing changed since


def test_the_configured_language_picks_the_localized_label() -> None:
    label = {
        "LocalizedLabels": [
            {"Label": "Web", "LanguageCode": 1033},
            {"Label": "Webseite", "LanguageCode": 1031},
        ],
        "UserLocalizedLabel": {"Label": "Web", "LanguageCode": 1033},
    }
    assert orgmeta.localized(label, 1031) == "Webseite"
    assert (
        orgmeta.localized(label, None) == "Web" and orgmeta.localized(label, 1036) == "Web"
    )  # the user's label
    assert orgmeta.localized({"LocalizedLabels": [], "UserLocalizedLabel": None}) == ""
