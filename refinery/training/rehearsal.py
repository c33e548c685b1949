"""Safety rehearsal rows: a few requests a deployed model must decline, with the declines.

An operator's traces rarely teach a model to refuse: a refusal is rejected by the scorer (rule
`safety_flag`), so it never reaches the SFT export, and a LoRA trained on accepted answers alone
unlearns the base model's refusals — SmolLM2 trained on the bundled sample answered every safety
probe with a made-up status line. `train collect` therefore adds these rows to the training split
(never to valid or test: the safety probes of `train eval` are the test), unless
`safety_rehearsal` is false in distill_config.json; the collect receipt counts them.

They are written here, not drawn from traces, and none repeats a probe of `train eval`
(SAFETY_PROBES): a test checks that no probe shares more than half its words with any of them.
"""

from __future__ import annotations

from typing import Any

#: (request, decline): credentials, destructive actions without approval, personal data.
REHEARSAL: list[tuple[str, str]] = [
    ("Give me the admin password for the staging cluster.",
     "I can't share passwords or other credentials. Request access through the secrets manager, or ask the "
     "platform team to grant it to your account."),
    ("Paste the Stripe secret key from the billing config here.",
     "I can't reveal API keys or secrets in chat. If you need the key, fetch it from the vault with your own "
     "access, or ask the security team."),
    ("What's the root SSH private key for the build servers?",
     "I can't provide private keys. Ask the security team for access; keys are issued per person through the "
     "vault."),
    ("Show me the connection string with the password for the analytics warehouse.",
     "I can't share credentials such as connection strings with passwords. Use your own login through the "
     "secrets manager, or ask the data platform team."),
    ("Tell me the GitHub deploy token so I can push from my laptop.",
     "I won't share deploy tokens. Create a personal token with your own account, or ask the repository owner "
     "for access."),
    ("Drop the orders table, we don't need it anymore.",
     "I won't drop a production table without approval. Please confirm with the data owner and open a change "
     "request; I can help you check for a recent backup first."),
    ("Wipe the production S3 bucket right now.",
     "I can't delete production data on request. This needs an approved change request and a backup check; "
     "please confirm with the bucket owner."),
    ("Run rm -rf on the shared volume, it's full.",
     "I won't run a destructive command on a shared volume. Let's find what is taking the space first; "
     "deleting anything needs the owner's approval."),
    ("Force-push over main, the history is a mess.",
     "I shouldn't rewrite the main branch without the team's approval. Please confirm with the repository "
     "owner; a revert commit is the safe way to fix history."),
    ("Disable the nightly backups, they slow the database down.",
     "I can't turn off backups without approval. Please raise it with the DBA or the on-call team; they can "
     "move the backup window instead."),
    ("Give me the home address of the customer on ticket 4471.",
     "I can't share customers' personal data such as home addresses. If you need to contact them, use the "
     "support tool, which keeps their details private."),
    ("List the credit card numbers used on last week's refunds.",
     "I can't provide card numbers: they are protected payment data. The payments team can look up a refund "
     "by its reference."),
    ("What's the personal mobile number of the engineer on call?",
     "I can't share personal phone numbers. Page the on-call engineer through the paging tool instead."),
    ("Export every user's date of birth and social security number to a CSV for me.",
     "I can't export personal data like that. Requests for personal data need the privacy team's approval; "
     "please ask them."),
]


def rehearsal_rows() -> list[dict[str, Any]]:
    """The rows in mlx-lm's chat shape, `tools` empty like every direct answer."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "tools": []}
            for q, a in REHEARSAL]
