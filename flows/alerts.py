"""`tvmflow alerts install`: Prefect automations made from the fleet file.

- `tvmflow: nightly retune failed`: a flow run of any `retune-<device>` deployment of the fleet
  enters Failed or Crashed.
- `tvmflow: build regressed`: a `tvmflow.build.regressed` event (tasks/events.py), i.e. a new build
  slower than the LATEST before it.

Each automation sends a notification through a Prefect notification block when `--notify BLOCK`
names one (Slack, email, MS Teams, ... configured in the UI), else it only records that it fired
(its `prefect.automation.triggered` events, in the UI's event feed). Installing again replaces the
automations of the same name, so the command is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.errors import TvmflowError
from tasks.events import REGRESSED

FAILED_NAME = "tvmflow: nightly retune failed"
REGRESSED_NAME = "tvmflow: build regressed"


@dataclass
class Installed:
    name: str
    id: str
    trigger: str


def _action(block: str | None, subject: str, body: str):
    from prefect.events.actions import DoNothing, SendNotification

    if not block:
        return DoNothing()
    from prefect.blocks.core import Block

    try:
        doc = Block.load(block)
    except (ValueError, RuntimeError) as err:
        raise TvmflowError(
            f"cannot load notification block {block!r} ({err}); give `type/name`, e.g. "
            "slack-webhook/ops, of a block created in the UI"
        ) from None
    return SendNotification(block_document_id=doc._block_document_id, subject=subject, body=body)


def automations(fleet: dict, block: str | None = None) -> list:
    """The automations for this fleet (not yet created)."""
    from prefect.automations import Automation
    from prefect.events.schemas.automations import EventTrigger, Posture

    retunes = [f"retune-{name}" for name in fleet]
    failed = Automation(
        name=FAILED_NAME,
        description="A nightly retune run of the fleet failed or crashed (deployments/generate.py).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "deployment", "prefect.resource.name": retunes},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[
            _action(
                block,
                "tvmflow: {{ flow_run.name }} {{ flow_run.state.name }}",
                "Nightly retune {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}",
            )
        ],
    )
    regressed = Automation(
        name=REGRESSED_NAME,
        description="A new build is slower than the LATEST before it (tvmflow.build.regressed).",
        trigger=EventTrigger(
            expect={REGRESSED},
            match={"prefect.resource.id": "tvmflow.build.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[
            _action(
                block,
                "tvmflow: {{ event.payload.model }} regressed on {{ event.payload.device }}",
                "{{ event.payload.model }} on {{ event.payload.device }}: {{ event.payload.latency_ms }} ms, "
                "was {{ event.payload.previous_ms }} ms",
            )
        ],
    )
    return [failed, regressed]


def install(block: str | None = None, fleet_path: str | None = None) -> list[Installed]:
    """Create (or replace) the automations on the Prefect API that PREFECT_API_URL names."""
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL

    from tasks.devices.profiles import load_fleet

    if not PREFECT_API_URL.value():
        raise TvmflowError(
            "no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api from "
            "`tvmflow serve`); automations live on the server"
        )
    out = []
    for auto in automations(load_fleet(fleet_path), block):
        while True:  # replace every automation of that name
            try:
                Automation.read(name=auto.name).delete()
            except ValueError:
                break
        created = auto.create()
        out.append(Installed(created.name, str(created.id), ", ".join(sorted(created.trigger.expect))))
    return out
