"""Access control: identities, rules, tokens, pass-through and limits."""
