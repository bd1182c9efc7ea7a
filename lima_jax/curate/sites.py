"""Which Stack Exchange site belongs to which group: STEM, Other, or niche (left out).

LIMA splits the exchanges into 75 STEM and 99 other ones and drops 5 niche ones, without listing
them. The table below is ours; its niche sites are the five whose posts are not in English.
Meta sites (about a site itself) are always left out.

A sites file overrides or extends the table, in the table's own format: one group per line,
`GROUP: site site ...`, with GROUP one of stem, other, niche and `#` starting a comment.
A site is named by its dump folder without the domain: `math.stackexchange.com` -> `math`,
`stackoverflow.com` -> `stackoverflow`, `es.stackoverflow.com` -> `es.stackoverflow`.
"""

import re

from lima_jax.errors import LimaError

GROUPS = ("stem", "other")
NICHE = "niche"

_TABLE = """
stem: stackoverflow superuser serverfault askubuntu mathoverflow math physics stats cs cstheory
stem: tex unix softwareengineering dba codereview codegolf gamedev electronics chemistry biology
stem: astronomy earthscience engineering datascience ai quantumcomputing crypto security
stem: networkengineering apple android raspberrypi arduino webapps webmasters wordpress drupal
stem: magento salesforce sharepoint gis mathematica matheducators hsm scicomp bioinformatics
stem: robotics dsp reverseengineering sqa devops softwarerecs hardwarerecs blender emacs vi
stem: computergraphics ux tor iot opendata 3dprinting ham space retrocomputing ethereum bitcoin
stem: quant mattermodeling or proofassistants langdev joomla craftcms civicrm sitecore tridion
stem: elementaryos medicalsciences psychology cseducators cs50 windowsphone genai drones monero
stem: cardano tezos eosio iota substrate solana stellar expressionengine
other: english ell cooking travel diy gaming scifi movies music photo graphicdesign bicycles
other: fitness outdoors gardening pets parenting money law politics history philosophy
other: christianity judaism islam hinduism buddhism mythology skeptics worldbuilding writing
other: literature linguistics german french spanish italian japanese chinese russian portuguese
other: korean latin ukrainian esperanto hermeneutics academia workplace interpersonal lifehacks
other: puzzling chess boardgames rpg anime sports freelancing expatriates genealogy homebrew
other: coffee alcohol woodworking crafts video avp poker martialarts musicfans vegetarianism
other: sustainability health bricks languagelearning conlang economics mechanics aviation
other: ebooks patents opensource communitybuilding moderators stackapps pm
niche: es.stackoverflow pt.stackoverflow ru.stackoverflow ja.stackoverflow rus
"""


def parse(text: str, where: str) -> dict[str, str]:
  """site -> group from the `GROUP: site site ...` format; later lines win."""
  table = {}
  for number, line in enumerate(text.splitlines(), start=1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    group, sep, names = line.partition(":")
    group = group.strip().lower()
    if not sep or group not in GROUPS + (NICHE,):
      raise LimaError(f"{where}:{number}: expected `stem: site ...`, `other: site ...` or "
                      f"`niche: site ...`, got {line[:60]!r}")
    for name in names.split():
      table[name.lower()] = group
  return table


def table(override_path: str | None = None) -> dict[str, str]:
  """The built-in table, updated by the sites file if one is given."""
  sites = parse(_TABLE, "built-in site table")
  if override_path:
    try:
      with open(override_path, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise LimaError(f"cannot read sites file {override_path}: "
                      f"{getattr(e, 'strerror', None) or e}") from None
    sites.update(parse(text, override_path))
  return sites


_DOMAIN = re.compile(r"\.(stackexchange\.com|com|net)$")


def site_name(folder: str) -> str:
  """The table's name of a dump folder: its name without the domain."""
  return _DOMAIN.sub("", folder.lower())


def is_meta(name: str) -> bool:
  return "meta" in name.split(".")
