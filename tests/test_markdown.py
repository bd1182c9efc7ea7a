"""The one renderer for answers in pages: Markdown shows formatted, nothing in an answer runs."""

from lima_jax.markdown import to_html


def test_markdown_is_rendered():
  html = to_html("**bold**, `code`\n\n```\nx = 1\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
  assert "<strong>bold</strong>" in html and "<code>code</code>" in html
  assert "<pre><code>x = 1" in html and "<td>1</td>" in html


def test_html_in_an_answer_is_text():
  for attack in ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                 '<a href="#" onclick="alert(1)">x</a>', "<style>body{display:none}</style>"]:
    html = to_html(attack)
    assert "<script" not in html and "<img" not in html and "<style" not in html
    assert "<a " not in html  # no live tag, so no live handler (its text may stay, escaped)
    assert "&lt;" in html  # shown to the reader as the text it is


def test_only_safe_link_targets():
  assert "href" not in to_html("[x](javascript:alert(1))")
  html = to_html("[docs](https://example.org)")
  assert 'href="https://example.org"' in html and "noopener" in html
