"""``single_turn_agent``: one generation from the dataset's prompt tokens (what ``rollout.mode=sync`` does, through
a server)."""
from __future__ import annotations

from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, new_request_id, register

__all__ = ["SingleTurnAgentLoop"]


@register("single_turn_agent")
class SingleTurnAgentLoop(AgentLoopBase):

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        prompt_ids = kwargs.get("raw_prompt_ids")
        if prompt_ids is None:
            if kwargs.get("raw_prompt") is None:
                raise ValueError("single_turn_agent needs the row's raw_prompt_ids (RLHFDataset gives them) or "
                                 "raw_prompt messages (data.return_raw_chat=True)")
            prompt_ids = self.apply_chat_template(list(kwargs["raw_prompt"]))
        prompt_ids = [int(t) for t in prompt_ids]
        out = await self.server_manager.generate(new_request_id(),
                                                 prompt_ids=prompt_ids,
                                                 sampling_params=dict(sampling_params,
                                                                      max_new_tokens=self.response_length))
        ids = out.token_ids[:self.response_length]
        log_probs = out.log_probs[:self.response_length] if out.log_probs is not None else None
        return AgentLoopOutput(prompt_ids=prompt_ids,
                               response_ids=ids,
                               response_mask=[1] * len(ids),
                               response_logprobs=log_probs,
                               num_turns=2,
                               metrics={"generated_tokens": float(len(ids))})
