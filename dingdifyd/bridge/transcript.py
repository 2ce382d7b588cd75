"""What one Dify run said, as the card should show it, and how the run ended. Pure: events in, text out.

The answer text grows with `message` / `agent_message` / `text_chunk` deltas. Dify 1.x streams a reasoning
model's thinking apart from the answer (`reasoning_chunk`); it is kept as a `<think>` block in front of the answer
so that `show_reasoning` treats it exactly like a model that writes `<think>` itself (bridge/markdown.py). Output
moderation (`message_replace` / `text_replace`) replaces the answer, and nothing of the original text may follow.
A workflow that streamed nothing answers with its outputs. The run ends answered, stopped (by someone else than
this answer's person: the Dify console, another host), cut (1.x aborts a run whose client went away), or paused
for a human-input form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dingdifyd.dify.events import (
    DifyEvent,
    HumanInputRequired,
    ReasoningDelta,
    TextDelta,
    TextReplace,
    WorkflowFinished,
    WorkflowPaused,
    text_from_outputs,
)
from dingdifyd.dify.forms import HumanInputForm

FINISHED_STATUSES = ("succeeded", "partial-succeeded")
# 1.16.1 aborts a run whose client response closed before it completed: the stream's end says so
CLIENT_GONE_MARK = "Client response stream closed"


class Ending(enum.Enum):
    ANSWERED = "answered"
    STOPPED = "stopped"  # stopped in Dify by someone else: the card keeps the text and says so
    CUT = "cut"  # Dify aborted it because the stream to us broke
    PAUSED = "paused"  # waits for a human-input form


@dataclass
class Transcript:
    answer: str = ""
    reasoning: str = ""
    reasoning_closed: bool = False
    moderated: bool = False  # the answer was replaced by moderation: later deltas are not the answer's
    status: str = ""  # the run's end as `workflow_finished` gave it
    error: str = ""
    forms: tuple[HumanInputForm, ...] = field(default=())
    paused: bool = False
    from_outputs: bool = False  # the answer is the run's outputs (its End node ran), not streamed text
    run_id: str = ""  # the workflow run (chatflows and workflows), once an event named it
    conversation_id: str = ""

    def feed(self, event: DifyEvent) -> bool:
        """Take one event; True when the text the card shows changed."""
        before = self.raw
        self.run_id = self.run_id or event.workflow_run_id
        self.conversation_id = self.conversation_id or event.conversation_id
        if isinstance(event, TextDelta):
            if not self.moderated:
                if event.text and self.reasoning:
                    self.reasoning_closed = True  # the answer starts: the thinking is over
                self.answer += event.text
        elif isinstance(event, TextReplace):
            self.answer = event.text
            self.moderated = self.moderated or event.moderated
        elif isinstance(event, ReasoningDelta):
            if not self.reasoning_closed:
                self.reasoning += event.text
                self.reasoning_closed = event.is_final
        elif isinstance(event, HumanInputRequired):
            if event.form is not None and not any(f.form_id == event.form.form_id for f in self.forms):
                self.forms = (*self.forms, event.form)
        elif isinstance(event, WorkflowPaused):
            known = {f.form_id for f in self.forms}
            self.forms = (*self.forms, *(f for f in event.forms if f.form_id not in known))
            self.paused = True
        elif isinstance(event, WorkflowFinished):
            self.status, self.error = event.status, event.error
            self.paused = False
            outputs_text = text_from_outputs(event.outputs)
            if event.status == "stopped" and outputs_text:
                # its End node ran: 1.16.1 ends resumed workflows "stopped" all the same, with the outputs its
                # run record holds (dify/guarded.py reads them). They are the answer.
                self.answer, self.from_outputs = outputs_text, True
            elif not self.answer.strip() and event.status in FINISHED_STATUSES:
                self.answer = outputs_text  # a workflow whose End node streamed nothing
        return self.raw != before

    @property
    def raw(self) -> str:
        """The text as Dify meant it: the thinking (if any) as a `<think>` block, then the answer."""
        if not self.reasoning.strip():
            return self.answer
        if not self.reasoning_closed and not self.answer:
            return f"<think>{self.reasoning}"  # still thinking: the card shows "Thinking…" (or the quote)
        return f"<think>{self.reasoning}</think>\n\n{self.answer}"

    @property
    def ending(self) -> Ending:
        if self.paused:
            return Ending.PAUSED
        if self.status == "stopped" and not self.from_outputs:
            # (with outputs, its End node ran: 1.16.1's resumed workflows end "stopped" all the same)
            return Ending.CUT if CLIENT_GONE_MARK in self.error else Ending.STOPPED
        return Ending.ANSWERED
