"""twisted.web plumbing shared by every HTTP-family endpoint."""
