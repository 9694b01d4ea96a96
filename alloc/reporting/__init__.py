"""What a person reads after a plan: the HTML/Markdown report (report), its charts (plots), and llama.cpp's
mixes as baseline plans to compare against (baselines)."""
