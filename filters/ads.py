"""Advertising images, by rules: a link to an ad server, a standard banner size, an ad alt text, or a
linked image to another site placed after the article's last text.

`ad_condition` is a Spark expression over the image rows' columns (`link`, `alt`, `src`, `width`,
`height`, `declared_width`, `declared_height`, `is_last`, `page_host`); the ad-server domains come
from the file `domains_file` names (one domain a line, `#` comments), else the short built-in list.
"""
from __future__ import annotations

import dataclasses

# a few of the largest ad-serving domains (a real run points domains_file at a maintained list,
# e.g. an EasyList/AdGuard domain export)
BUILTIN_DOMAINS = ("doubleclick.net", "googlesyndication.com", "googleadservices.com", "adnxs.com",
                   "adservice.google.com", "taboola.com", "outbrain.com", "criteo.com", "amazon-adsystem.com",
                   "pubmatic.com", "rubiconproject.com", "openx.net", "adform.net", "adroll.com", "media.net",
                   "moatads.com", "smartadserver.com", "zedo.com", "revcontent.com", "mgid.com")
# IAB standard banner sizes (width x height)
BANNERS = ("728x90", "468x60", "234x60", "120x600", "160x600", "300x600", "300x250", "336x280", "250x250",
           "200x200", "320x50", "320x100", "970x90", "970x250", "300x50", "120x240", "125x125", "180x150")


@dataclasses.dataclass(frozen=True)
class Ads:
    enabled: bool = True
    domains_file: str = ""  # one ad-server domain a line; "" = the built-in list
    banner_sizes: tuple[str, ...] = BANNERS  # "WxH"; an image (or its declared size) of exactly one is an ad
    alt_words: tuple[str, ...] = ("advertisement", "advert", "sponsored", "ad", "ads", "werbung", "广告")
    last_linked_elsewhere: bool = True  # a linked image to another host after the article's last text

    def domains(self) -> tuple[str, ...]:
        if not self.domains_file:
            return BUILTIN_DOMAINS
        with open(self.domains_file, encoding="utf-8") as f:
            return tuple(d for d in (ln.split("#", 1)[0].strip().lower() for ln in f) if d)

    def condition(self):
        """Column: the image is an ad by one of the rules."""
        from pyspark.sql import functions as F

        host = F.lower(F.regexp_extract(F.coalesce(F.col("link"), F.lit("")), r"^[a-zA-Z]+://([^/:?#]+)", 1))
        src_host = F.lower(F.regexp_extract(F.coalesce(F.col("src"), F.lit("")), r"^[a-zA-Z]+://([^/:?#]+)", 1))
        ad_host = F.lit(False)
        for d in self.domains():
            for h in (host, src_host):
                ad_host = ad_host | (h == d) | h.endswith("." + d)
        size = F.concat_ws("x", F.col("width"), F.col("height"))
        declared = F.concat_ws("x", F.col("declared_width"), F.col("declared_height"))
        banner = size.isin(list(self.banner_sizes)) | declared.isin(list(self.banner_sizes))
        words = "|".join(w for w in self.alt_words)
        alt = F.lower(F.coalesce(F.col("alt"), F.lit(""))).rlike(rf"(^|[^\w])({words})([^\w]|$)")
        cond = ad_host | banner | alt
        if self.last_linked_elsewhere:
            cond = cond | (F.col("is_last") & (host != "") & (host != F.col("page_host")))
        return cond
