"""Recognizers of identifying values in text: Korean RRNs and phone numbers, e-mail
addresses, dates of birth and person names; and of identifying column names.

They are pure functions over ``str`` and return spans with a confidence, never the matched
text, so that callers (ingest, the export screen) can say *where* an identifier is without
repeating it. Full-width digits and dashes are read as ASCII; spans index the original text.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import unicodedata
from dataclasses import dataclass

RRN = "rrn"
PHONE = "phone"
EMAIL = "email"
BIRTH_DATE = "birth_date"
PERSON_NAME = "person_name"

#: What each kind is called in a finding ("… (looks like <description>)").
KIND_DESCRIPTIONS = {
    RRN: "a resident registration number",
    PHONE: "a phone number",
    EMAIL: "an e-mail address",
    BIRTH_DATE: "a date of birth",
    PERSON_NAME: "a person name",
}


@dataclass(frozen=True)
class IdentifierMatch:
    """``text[start:end]`` looks like an identifier of ``kind`` (confidence 0–1)."""

    kind: str
    start: int
    end: int
    confidence: float


# --- normalisation that keeps offsets --------------------------------------------------

def _one_to_one_table() -> dict[int, str]:
    table = {0xFF10 + i: str(i) for i in range(10)}  # full-width digits
    table.update({0xFF21 + i: chr(ord("A") + i) for i in range(26)})
    table.update({0xFF41 + i: chr(ord("a") + i) for i in range(26)})
    for dash in ("\uff0d", "\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2015", "\u2212",
                 "\ufe63"):
        table[ord(dash)] = "-"
    table.update({0xFF0B: "+", 0xFF20: "@", 0xFF0E: ".", 0xFF08: "(", 0xFF09: ")",
                  0xFF0F: "/", 0xFF1A: ":", 0x3000: " ", 0x00A0: " ", 0xFF3E: "^", 0xFF3F: "_"})
    return table


_ONE_TO_ONE = _one_to_one_table()


def fold_width(text: str) -> str:
    """Full-width digits, letters and punctuation as ASCII, one character for one (offsets kept)."""
    if text.isascii():  # nothing to fold (and translate() is slow)
        return text
    return text.translate(_ONE_TO_ONE)


# --- resident registration numbers -----------------------------------------------------

# A leading lookahead (a digit here) lets the regex engine skip to possible starts fast.
_RRN_RE = re.compile(
    r"(?=\d)(?<![\d.,])(?P<birth>\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))"
    r"(?P<sep>\s?-\s?|\s)?(?P<sex>[1-8])(?P<rest>\d{6}|\*{6}|[xX]{6})(?![\d*]|[.,]\d)")
_SIX_DIGITS_RE = re.compile(r"\d{6}")
_RRN_CONTEXT = re.compile(r"주민|rrn|resident|registration|jumin", re.I)
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)


def rrn_check_digit_valid(digits: str) -> bool:
    """The pre-2020 RRN checksum; numbers issued since October 2020 fail it legitimately."""
    if len(digits) != 13 or not digits.isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits, _RRN_WEIGHTS))
    return (11 - total % 11) % 10 == int(digits[12])


def _find_rrns(text: str) -> list[IdentifierMatch]:
    if not _SIX_DIGITS_RE.search(text):  # the birth date: six digits in a row
        return []
    out = []
    for m in _RRN_RE.finditer(text):
        rest = m.group("rest")
        if not rest.isdigit():  # masked: the birth date and sex digit still identify
            confidence = 0.7
        else:
            confidence = 0.75 if m.group("sep") else 0.6
            if rrn_check_digit_valid(m.group("birth") + m.group("sex") + rest):
                confidence += 0.2
        if _RRN_CONTEXT.search(text, max(0, m.start() - 24), m.start()):
            confidence += 0.1
        out.append(IdentifierMatch(RRN, m.start(), m.end(), min(confidence, 0.99)))
    return out


# --- phone numbers ---------------------------------------------------------------------

# Hangul may touch the number ("휴대폰010-…", "…5678로"): only ASCII letters and digits
# around it make it part of something else.
_PHONE_RE = re.compile(
    r"""(?=[+(0])(?<![A-Za-z0-9_+.])
    (?:(?P<intl>\+82[\s.-]?(?:\(0\)[\s.-]?)?)|(?P<paren>\()?0)
    (?P<area>1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|50[2-8]|80)
    (?(paren)\))
    (?P<sep1>[\s.-]?)(?P<mid>\d{3,4})(?P<sep2>[\s.-]?)(?P<last>\d{4})
    (?![A-Za-z0-9_]|[.,]\d)""", re.X)
# Nationwide numbers (1588-xxxx …) look like ranges ("1500-2000 HU") without a phone word.
_REPRESENTATIVE_RE = re.compile(r"(?=1)(?<![\w.-])1[5-9]\d\d-\d{4}(?![\w-]|[.,]\d)")
_PHONE_CONTEXT = re.compile(r"phone|tel\b|mobile|fax|연락|전화|휴대|핸드폰|☎", re.I)


def _find_phones(text: str) -> list[IdentifierMatch]:
    out = []
    for m in _PHONE_RE.finditer(text):
        mobile = m.group("area").startswith("1")
        seps = m.group("sep1") + m.group("sep2")
        if m.group("intl"):
            confidence = 0.9
        elif "-" in seps or m.group("paren"):
            confidence = 0.9
        elif seps:
            confidence = 0.75
        else:
            confidence = 0.75 if mobile else 0.5
        if _PHONE_CONTEXT.search(text, max(0, m.start() - 20), m.start()):
            confidence = min(confidence + 0.1, 0.99)
        out.append(IdentifierMatch(PHONE, m.start(), m.end(), confidence))
    for m in _REPRESENTATIVE_RE.finditer(text):
        if _PHONE_CONTEXT.search(text, max(0, m.start() - 20), m.start()):
            out.append(IdentifierMatch(PHONE, m.start(), m.end(), 0.7))
    return out


# --- e-mail ----------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}(?![\w])")


def _find_emails(text: str) -> list[IdentifierMatch]:
    if "@" not in text:
        return []
    return [IdentifierMatch(EMAIL, m.start(), m.end(), 0.95) for m in _EMAIL_RE.finditer(text)]


# --- dates -----------------------------------------------------------------------------

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH_RE = r"(?i:(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?)"

#: A whole value that is a date: ISO-like with - . / or none, an optional time after it.
_DATE_VALUE_RE = re.compile(
    r"^\s*(?P<y>(?:19|20)\d\d)(?P<s>[-./]?)(?P<m>0[1-9]|1[0-2])(?P=s)(?P<d>0[1-9]|[12]\d|3[01])"
    r"(?P<time>(?:[T ]\d\d(?::?\d\d(?::?\d\d(?:\.\d+)?)?)?(?:Z|[+-]\d\d:?\d\d)?)?)\s*$")
_DATE_VALUE_LOOSE_RE = re.compile(
    r"^\s*(?P<y>(?:19|20)\d\d)(?P<s>[-./])(?P<m>0?[1-9]|1[0-2])(?P=s)(?P<d>0?[1-9]|[12]\d|3[01])"
    r"\s*$")
_DATE_VALUE_KO_RE = re.compile(
    r"^\s*(?P<y>(?:19|20)\d\d)\s*년\s*(?P<m>0?[1-9]|1[0-2])\s*월"
    r"\s*(?P<d>0?[1-9]|[12]\d|3[01])\s*일\s*$")


def parse_date(value: str) -> dt.date | None:
    """The calendar date a whole value spells (2023-01-15, 2023.1.15, 20230115,
    2023-01-15T10:30, 2023년 1월 15일), or None."""
    text = fold_width(str(value))
    for pattern in (_DATE_VALUE_RE, _DATE_VALUE_LOOSE_RE, _DATE_VALUE_KO_RE):
        m = pattern.match(text)
        if m:
            try:
                return dt.date(int(m.group("y")), int(m.group("m")), int(m.group("d")))
            except ValueError:
                return None
    return None


# Dates inside free text, for the date-of-birth recognizer. The lookahead on the first
# character (a digit or a month's initial) lets the scan skip other positions fast; only
# month names ignore case.
_DATE_IN_TEXT_RE = re.compile(
    r"(?i:(?=[\dadfjmnos]))(?<![\d.])(?:"
    r"(?:19|20)\d\d[-./ ](?:0?[1-9]|1[0-2])[-./ ](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    r"|(?:19|20)\d\d\s*년\s*\d{1,2}\s*월\s*\d{1,2}\s*일"
    r"|(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:19|20)\d\d"
    r"|(?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])[-./](?:19|20)\d\d"
    rf"|{_MONTH_RE}\s+\d{{1,2}},?\s+(?:19|20)\d\d"
    rf"|\d{{1,2}}\s+{_MONTH_RE},?\s+(?:19|20)\d\d"
    r"|\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # YYMMDD: only right after a birth word
    r")(?![\d]|[.,]\d)")
_BIRTH_CONTEXT = re.compile(r"birth|born|\bdob\b|d\.o\.b|생년월일|생일|출생", re.I)


# Without the word boundaries: a search that ends right after "DOB" (as the recognizer's
# does) finds it even when a digit follows in the whole text.
_BIRTH_WORD = re.compile(r"birth|born|dob|d\.o\.b|생년월일|생일|출생", re.I)


_BIRTH_WORDS_ASCII = ("birth", "born", "dob", "d.o.b")


def _has_birth_word(text: str) -> bool:
    """Whether a birth word may be anywhere in ``text`` (a cheap test before the scan)."""
    if text.isascii():  # lower() is exact for ASCII and "in" is far faster than the regex
        lowered = text.lower()
        return any(word in lowered for word in _BIRTH_WORDS_ASCII)
    return _BIRTH_WORD.search(text) is not None


def _find_birth_dates(text: str) -> list[IdentifierMatch]:
    if not _has_birth_word(text):  # no date of birth (and no scan for dates)
        return []
    out = []
    previous_end = 0
    for m in _DATE_IN_TEXT_RE.finditer(text):
        # The birth word must sit between the previous date and this one, close before it:
        # "DOB 1985-03-12, scanned 2023-01-15" flags only the first date.
        window_start = max(previous_end, m.start() - 30)
        context = _BIRTH_CONTEXT.search(text, window_start, m.start())
        previous_end = m.end()
        if not context:
            continue
        short = m.group().isdigit() and len(m.group()) == 6
        if short and m.start() - context.end() > 4:
            continue
        out.append(IdentifierMatch(BIRTH_DATE, m.start(), m.end(), 0.6 if short else 0.8))
    return out


# --- person names ----------------------------------------------------------------------

#: Common Korean surnames (about 99% of the population), one syllable and compound.
HANGUL_SURNAMES = frozenset(
    "김 이 박 최 정 강 조 윤 장 임 한 오 서 신 권 황 안 송 류 유 전 홍 고 문 양 손 배 백 허 남 "
    "심 노 하 곽 성 차 주 우 구 민 나 진 지 엄 채 원 천 방 공 현 함 변 염 여 추 도 소 석 선 설 "
    "마 길 연 위 표 명 기 반 라 왕 금 옥 육 인 맹 제 모 탁 국 어 은 편 용 예 경 봉 사 부 빈 태 "
    "피 감 호 형 두 승 목 시".split())
HANGUL_COMPOUND_SURNAMES = frozenset("남궁 황보 제갈 선우 독고 사공 서문 동방".split())

#: Romanised Korean surnames (several spellings each).
ROMAN_SURNAMES = frozenset(
    "kim gim lee yi rhee ri rhie park pak bak choi choe chwe jung jeong chung joung kang gang "
    "cho jo yoon yun jang chang lim im yim han oh seo suh shin sin kwon gwon hwang ahn an song "
    "ryu yoo yu jeon chun jun hong ko go koh moon mun yang son sohn bae baek paik paek heo huh "
    "nam shim sim noh roh no ha kwak gwak sung seong cha joo ju woo wu koo ku gu min na ra "
    "jin chin ji chi eom um chae won cheon bang gong kong hyun hyeon ham byun byeon yeom yeo "
    "choo chu do doh so seok suk sun seon sul seol ma gil kil yeon wi pyo myung myeong ki gi "
    "ban wang geum keum ok yook yuk in maeng je mo tak kook guk namgung hwangbo jegal sunwoo "
    "seonwoo dokgo sagong".split())

# A romanised Korean syllable (initial, vowel, final); given names are 1–3 of them.
_ROMAN_SYLLABLE = (r"(?:kk|tt|pp|ss|jj|ch|sh|[gkndtrlmbpsjh])?"
                   r"(?:yae|yeo|wae|ae|ya|eo|ye|wa|oe|yo|wo|we|wi|yu|eu|ui|oo|ee|ou|ei|a|e|i|o|u)"
                   r"(?:ng|[knlmptgrb])?")
_ROMAN_GIVEN_RE = re.compile(rf"(?:{_ROMAN_SYLLABLE}){{1,3}}")

# Common words that happen to start with a surname syllable or parse as romanised names.
_HANGUL_NOT_NAMES = frozenset(
    "정상 이상 양성 음성 우측 전체 조영 조영제 이전 이후 이하 최근 최대 최소 한쪽 오른쪽 정도 "
    "성별 강도 남성 여성 남자 여자 고령 고도 경도 중등도 중증 경증 미상 기타 안정 신경 신장 "
    "심장 유방 유무 전이 진단 방사선 정기 정밀 추적 추가 석회 석회화 장기 장애 하엽 하부 상부 "
    "우상엽 우하엽 중엽 설명 변화 표준 현재 소견 소량 다발 미세 반복 방문 공기 기관 기흉 기종 "
    "노인 도움 동일 명확 문제 민감 배액 변형 부위 부분 금연 과거 흡연 비흡연 주의 주변 진행 "
    "감소 증가 의심 음영 병변 결절 결과 검사 수술 치료 추정 가능 불가 확인 필요 없음 있음 "
    "조직 전산 단층 촬영 영상 판독 판정 정보 환자 성명 이름 주소 전화 연락처 국가 지역 서울 "
    "부산 대구 인천 광주 대전 울산 세종 경기 강원 충북 충남 전북 전남 경북 경남 제주 한국 "
    "기관지 폐암 폐렴 폐결절 심비대 심낭 종양 종괴 용적 방향 위치 위쪽 아래 아래쪽 오전 오후".split())
_ROMAN_NOT_GIVEN = frozenset(
    "no not do so in on an a the and or of to is it at as by be see side none yes left right "
    "normal mass lung bone ok na male female man men woman women long nodule nodules lobe "
    "upper lower middle mild moderate "
    "severe never former current smoker unknown other ct mr mri pet us xr cxr dx cr head neck "
    "chest abdomen pelvis spine knee hand foot brain liver kidney heart axial coronal sagittal "
    "done open close high low mid new old hi bye".split())

_PLACEHOLDER_NAMES = frozenset(
    "anonymous anonymized anonymised anon removed unknown none null na n/a patient test "
    "phantom deidentified de-identified redacted xxx".split())


def _hangul_name_shape(word: str) -> bool:
    """Surname from the list + 1–2 syllables (compound surname + 1–2), not a common word."""
    if not re.fullmatch(r"[가-힣]{2,5}", word) or word in _HANGUL_NOT_NAMES:
        return False
    if word[:2] in HANGUL_COMPOUND_SURNAMES and 3 <= len(word) <= 4:
        return True
    return word[0] in HANGUL_SURNAMES and 2 <= len(word) <= 3


def _romanised_name_shape(tokens: list[str]) -> bool:
    """Korean romanisation: a known surname first or last, the rest given-name syllables."""
    lowered = [t.lower().replace("-", "").replace("'", "") for t in tokens]
    if not 2 <= len(lowered) <= 4 or any(not t.isalpha() or not t.isascii() for t in lowered):
        return False
    for surname, given in ((lowered[0], lowered[1:]), (lowered[-1], lowered[:-1])):
        if surname not in ROMAN_SURNAMES:
            continue
        if any(g in _ROMAN_NOT_GIVEN for g in given):
            continue
        if len("".join(given)) >= 2 and _ROMAN_GIVEN_RE.fullmatch("".join(given)):
            return True
    return False


def _letters_only(component: str) -> bool:
    stripped = re.sub(r"[\s.'-]", "", component)
    return bool(stripped) and all(ch.isalpha() for ch in stripped)


def looks_like_person_name(value) -> bool:
    """Whether a whole value (a cell, a PN element) is shaped like a person's name:
    DICOM PN ``Family^Given`` (any script), a Hangul full name, or a romanised Korean name."""
    text = unicodedata.normalize("NFKC", str(value)).strip()
    if not text or len(text) > 64 or text.lower() in _PLACEHOLDER_NAMES:
        return False
    if "^" in text or "=" in text:
        for group in text.split("="):
            parts = [p.strip() for p in group.split("^") if p.strip()]
            if any(p.lower() in _PLACEHOLDER_NAMES for p in parts):
                continue
            if len(parts) >= 2 and all(_letters_only(p) for p in parts[:2]):
                return True
            if len(parts) == 1 and looks_like_person_name(parts[0]):
                return True
        return False
    if re.fullmatch(r"[가-힣]{2,5}", text):
        return _hangul_name_shape(text)
    if re.fullmatch(r"[가-힣]{1,2} [가-힣]{1,2}", text):
        return _hangul_name_shape(text.replace(" ", ""))
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    return _romanised_name_shape(tokens)


# In running text a PN value is taken without spaces: "stored as Kim^Minjun" is not a family
# name "stored as Kim".
_PN_IN_TEXT_RE = re.compile(
    r"(?<![\w^])[^\W\d_]+(?:['-][^\W\d_]+)*\^[^\W\d_]+(?:['-][^\W\d_]+)*"
    r"(?:\^[^\s^=]*){0,3}(?:=[^\s=]*){0,2}")
_HANGUL_RUN_RE = re.compile(r"[가-힣]{2,8}")
# Honorifics and particles that follow a name in running Korean text.
_HANGUL_SUFFIXES = ("선생님", "교수님", "환자분", "환자", "님", "씨", "께서", "에게", "은", "는",
                    "이", "가", "의", "을", "를", "과", "와", "군", "양")
_HONORIFIC_AFTER = ("선생님", "교수님", "환자분", "환자", "님", "씨", "군", "양")
_NAME_CONTEXT_BEFORE = re.compile(
    r"(?:환자명|환자|성명|이름|성함|수진자|보호자|담당의|주치의|판독의|의사|교수|간호사|방사선사|"
    r"기사|(?<![A-Za-z])(?:name|patient|pt|dr|mr|mrs|ms|prof|physician|doctor))"
    r"\.?\s*[:=]?\s*$", re.I)
_NAME_CONTEXT_AFTER = re.compile(r"^\s*(?:\(\s*(?:남|여|m|f|\d{1,3})|님|씨|환자)", re.I)
_ROMAN_IN_CONTEXT_RE = re.compile(
    r"(?i:(?=[pnmdr])"
    r"\b(?P<ctx>patient|pt|name|mr|mrs|ms|miss|dr|doctor|prof|physician|referred by)\b)"
    r"\.?\s*[:=]?\s*(?P<name>[A-Z][A-Za-z'-]+(?:,?[ ][A-Z][A-Za-z'-]+){1,2})")
_HONORIFIC_TITLES = {"mr", "mrs", "ms", "miss", "dr", "doctor", "prof"}


# Context words written together with the name ("환자김민준").
_HANGUL_PREFIXES = ("환자명", "환자", "성명", "이름", "성함", "보호자", "수진자", "담당의", "주치의")


def _find_hangul_names(text: str) -> list[IdentifierMatch]:
    if text.isascii():
        return []
    out = []
    for m in _HANGUL_RUN_RE.finditer(text):
        run, start = m.group(), m.start()
        prefix = next((p for p in _HANGUL_PREFIXES
                       if run.startswith(p) and len(run) - len(p) >= 2), None)
        if prefix is not None:
            rest = run[len(prefix):]
            # Glued to a word, only full three-syllable names: "환자안전" is patient safety.
            for word in (rest, *(rest[:-len(s)] for s in _HANGUL_SUFFIXES if rest.endswith(s))):
                if len(word) >= 3 and _hangul_name_shape(word):
                    begin = start + len(prefix)
                    out.append(IdentifierMatch(PERSON_NAME, begin, begin + len(word), 0.75))
                    break
            continue
        candidates = [(run, "")]
        for suffix in _HANGUL_SUFFIXES:
            if run.endswith(suffix) and len(run) > len(suffix) + 1:
                candidates.append((run[: -len(suffix)], suffix))
        for word, suffix in candidates:
            if not _hangul_name_shape(word):
                continue
            end = start + len(word)
            before = text[max(0, start - 12):start]
            # A two-syllable name needs an honorific after it: "환자 안전" is patient safety.
            context = (suffix in _HONORIFIC_AFTER
                       or (not suffix and _NAME_CONTEXT_AFTER.match(text[end:end + 6]))
                       or (len(word) >= 3 and _NAME_CONTEXT_BEFORE.search(before)))
            if context:
                out.append(IdentifierMatch(PERSON_NAME, start, end, 0.75))
                break
    return out


def _find_romanised_names(text: str) -> list[IdentifierMatch]:
    out = []
    for m in _ROMAN_IN_CONTEXT_RE.finditer(text):
        tokens = [t for t in re.split(r"[ ,]+", m.group("name")) if t]
        if _romanised_name_shape(tokens):
            confidence = 0.75
        elif m.group("ctx").lower() in _HONORIFIC_TITLES and len(tokens) >= 2 and not any(
                t.lower() in _ROMAN_NOT_GIVEN for t in tokens):
            confidence = 0.6
        else:
            continue
        out.append(IdentifierMatch(PERSON_NAME, m.start("name"), m.end("name"), confidence))
    return out


def _find_pn_shaped(text: str) -> list[IdentifierMatch]:
    if "^" not in text:
        return []
    out = []
    for m in _PN_IN_TEXT_RE.finditer(text):
        if looks_like_person_name(m.group()):
            out.append(IdentifierMatch(PERSON_NAME, m.start(), m.end(), 0.85))
    return out


# --- all together ----------------------------------------------------------------------

def _without_overlaps(matches: list[IdentifierMatch]) -> list[IdentifierMatch]:
    """Where spans overlap keep the most confident (then the longest) one."""
    chosen: list[IdentifierMatch] = []
    for match in sorted(matches, key=lambda m: (-m.confidence, -(m.end - m.start), m.start)):
        if all(match.end <= c.start or match.start >= c.end for c in chosen):
            chosen.append(match)
    return sorted(chosen, key=lambda m: (m.start, m.end))


# Byte classes for ASCII text, to rule recognizers out with substring tests (far faster
# than a regex pass): digits as 0 and digit separators ([\s.-]) as -, for RRNs and phones;
# capitals as A, lower-case letters and ' - as a, for names after a context word.
_DIGIT_CLASSES = bytes(0x30 if chr(i).isdigit() else 0x2D if chr(i).isspace() or chr(i) in ".-"
                       else 0x78 for i in range(256))
_NAME_CLASSES = bytes(0x41 if 65 <= i <= 90 else 0x61 if 97 <= i <= 122 or chr(i) in "'-"
                      else i if chr(i) in ", " else 0x78 for i in range(256))


def _cheap_tests(text: str) -> tuple[bool, bool]:
    """(digits, names): whether an RRN or phone number, and a romanised name after a
    context word, may be in ``text`` at all. Necessary conditions only: every RRN and phone
    number holds two digits, an optional separator and four digits (``00-0000`` or
    ``000000``); every name after a context word holds a letter, an optional comma, a space
    and a capital."""
    if not text.isascii():
        return True, True
    raw = text.encode("ascii")
    digits = raw.translate(_DIGIT_CLASSES)
    names = raw.translate(_NAME_CLASSES)
    return (any(shape in digits for shape in _DIGIT_SHAPES),
            any(shape in names for shape in _NAME_SHAPES))


_DIGIT_SHAPES = (b"000000", b"00-0000")
_NAME_SHAPES = (b"a A", b"A A", b"a, A", b"A, A")


def mark_texts(haystack, needles, starts: list[int], marked: set[int]) -> None:
    """Add to ``marked`` the number of each text that holds one of ``needles``, where the
    texts are joined in ``haystack`` (``str`` or ``bytes``), text ``k`` from ``starts[k]``,
    and no needle can span two of them. One search per text that holds one at most."""
    ends = starts[1:] + [len(haystack)]
    for needle in needles:
        pos = haystack.find(needle)
        while pos >= 0:
            k = bisect.bisect_right(starts, pos) - 1
            marked.add(k)
            pos = haystack.find(needle, ends[k])


def texts_with_identifiers(joined: str, starts: list[int]) -> set[int]:
    """The numbers of the texts in which :func:`find_identifiers` may find something, of
    ASCII texts joined by NUL characters in ``joined`` (text ``k`` from ``starts[k]``): the
    same necessary conditions as for one text (:func:`_cheap_tests`, an ``@`` for e-mail
    addresses, a ``^`` for DICOM-style names, a birth word), each located by substring
    searches over the whole (a NUL is of no character class, so no shape spans two texts).
    Hangul names need non-ASCII text: the caller leaves such texts out."""
    marked: set[int] = set()
    raw = joined.encode("ascii")
    mark_texts(raw.translate(_DIGIT_CLASSES), _DIGIT_SHAPES, starts, marked)
    mark_texts(raw.translate(_NAME_CLASSES), _NAME_SHAPES, starts, marked)
    mark_texts(joined, ("@", "^"), starts, marked)
    mark_texts(joined.lower(), _BIRTH_WORDS_ASCII, starts, marked)
    return marked


def find_identifiers(text: str, *, min_confidence: float = 0.0) -> list[IdentifierMatch]:
    """Every identifier-like span in ``text``, in order, without overlaps."""
    if not text:
        return []
    folded = fold_width(str(text))
    digits, names = _cheap_tests(folded)
    matches = ((_find_rrns(folded) + _find_phones(folded) if digits else [])
               + _find_emails(folded)
               + _find_birth_dates(folded) + _find_pn_shaped(folded)
               + _find_hangul_names(folded) + (_find_romanised_names(folded) if names else []))
    return [m for m in _without_overlaps(matches) if m.confidence >= min_confidence]


def identifier_kinds(text: str, *, min_confidence: float = 0.5) -> set[str]:
    """The kinds of identifiers found in ``text`` (for findings that must not echo values)."""
    return {m.kind for m in find_identifiers(text, min_confidence=min_confidence)}


def describe_kinds(kinds) -> str:
    """"looks like a phone number, a person name" — the reason part of a finding."""
    return "looks like " + ", ".join(KIND_DESCRIPTIONS.get(k, k) for k in sorted(kinds))


# --- column names ----------------------------------------------------------------------

COLUMN_PATIENT_ID = "patient_id"
COLUMN_NAME = "name"
COLUMN_RRN = "rrn"
COLUMN_PHONE = "phone"
COLUMN_EMAIL = "email"
COLUMN_ADDRESS = "address"
COLUMN_BIRTH_DATE = "birth_date"
COLUMN_INSTITUTION = "institution"
COLUMN_PHYSICIAN = "physician"
COLUMN_ACCESSION = "accession"
COLUMN_UID = "uid"
COLUMN_DATE = "date"
COLUMN_FREE_TEXT = "free_text"

#: Column kinds that are direct identifiers: such a column is refused, or dropped.
IDENTIFYING_COLUMN_KINDS = {
    COLUMN_NAME: "person names",
    COLUMN_RRN: "resident registration numbers",
    COLUMN_PHONE: "phone numbers",
    COLUMN_EMAIL: "e-mail addresses",
    COLUMN_ADDRESS: "addresses",
    COLUMN_BIRTH_DATE: "dates of birth",
    COLUMN_INSTITUTION: "institution names",
    COLUMN_PHYSICIAN: "names of staff",
}

# (kind, English tokens, Korean substrings); the first rule that matches wins.
_COLUMN_RULES = (
    (COLUMN_BIRTH_DATE, {"birth", "dob", "birthdate", "birthday", "bday", "born"},
     ("생년월일", "생일", "출생", "생년")),
    (COLUMN_RRN, {"rrn", "ssn", "jumin", "residentnumber", "nationalid", "residentno"},
     ("주민",)),
    (COLUMN_EMAIL, {"email", "mail", "emailaddress"}, ("이메일", "메일")),
    (COLUMN_PHONE, {"phone", "tel", "telephone", "mobile", "cellphone", "fax", "hp",
                    "contact", "phoneno", "telno"}, ("전화", "연락처", "휴대", "핸드폰")),
    (COLUMN_ADDRESS, {"address", "addr", "street", "zip", "zipcode", "postcode", "postal",
                      "residence"}, ("주소", "우편번호", "거주지")),
    (COLUMN_INSTITUTION, {"institution", "hospital", "clinic", "facility"},
     ("병원", "의료기관", "기관명")),
    (COLUMN_PHYSICIAN, {"physician", "doctor", "radiologist", "surgeon", "referrer",
                        "clinician", "nurse", "technologist"},
     ("의사", "주치의", "담당의", "판독의", "판독자", "간호사")),
    (COLUMN_ACCESSION, {"accession", "accessionnumber", "accno", "accnum", "accessionno"},
     ("검사번호", "접수번호")),
    (COLUMN_PATIENT_ID, {"mrn", "pid", "patientid", "ptid", "chartno", "chartnumber",
                         "hospitalno", "hospitalnumber", "registrationno", "subjectid",
                         "caseid"}, ("환자번호", "등록번호", "병록번호", "차트번호", "환자id")),
    (COLUMN_FREE_TEXT, {"note", "notes", "comment", "comments", "memo", "remark", "remarks",
                        "text", "description", "desc", "narrative", "report", "impression",
                        "finding", "findings", "conclusion", "summary"},
     ("비고", "메모", "소견", "판독", "기록", "설명", "내용", "특이사항", "병력")),
)
_NAME_TOKENS = {"name", "names", "fullname", "firstname", "lastname", "surname", "givenname",
                "familyname", "nickname", "middlename", "maidenname"}
# Tokens that may stand beside "name" in a person-name column (patient_name, name_en …).
_NAME_QUALIFIERS = {"patient", "pt", "en", "eng", "english", "kr", "kor", "ko", "korean",
                    "hangul", "han", "roman", "romanized", "first", "last", "full", "given",
                    "family", "person", "mother", "father", "guardian", "subject", "local",
                    "legal", "birth", "middle"} | {str(i) for i in range(10)}
_KOREAN_NAME_COLUMNS = ("이름", "성명", "환자명", "성함", "한글명", "영문명", "보호자")
_PAIRS_AS_PATIENT_ID = ({"patient", "id"}, {"patient", "no"}, {"patient", "number"},
                        {"pt", "id"}, {"pt", "no"}, {"subject", "id"}, {"chart", "no"},
                        {"chart", "number"}, {"hospital", "number"}, {"record", "number"},
                        {"medical", "record", "number"}, {"patient", "key"}, {"case", "id"})
_DATE_TOKENS = {"date", "dt", "datetime", "dos"}


def _column_tokens(name: str) -> tuple[list[str], str]:
    text = unicodedata.normalize("NFKC", str(name)).strip()
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    lowered = text.lower()
    tokens = [t for t in re.split(r"[^0-9a-z가-힣]+", lowered) if t]
    return tokens, "".join(tokens)


def classify_column_name(name) -> str | None:
    """What a column's name says it holds (one of the ``COLUMN_*`` kinds), or None."""
    tokens, joined = _column_tokens(name)
    if not tokens:
        return None
    token_set = set(tokens)
    if any(k in joined for k in _KOREAN_NAME_COLUMNS) or (
            token_set & _NAME_TOKENS and token_set - _NAME_TOKENS <= _NAME_QUALIFIERS):
        return COLUMN_NAME
    if any(pair <= token_set for pair in _PAIRS_AS_PATIENT_ID) and len(token_set) <= 3:
        if not token_set & {"uid", "date", "name"}:
            return COLUMN_PATIENT_ID
    for kind, english, korean in _COLUMN_RULES:
        if token_set & english or joined in english or any(k in joined for k in korean):
            return kind
    if tokens[-1] == "uid" or joined.endswith("uid") or "instanceuid" in joined:
        return COLUMN_UID
    if (token_set & _DATE_TOKENS or any(t.endswith("date") for t in tokens)
            or any(k in joined for k in ("일자", "날짜", "일시", "검사일", "촬영일", "방문일",
                                        "내원일", "수술일", "진단일", "입원일", "퇴원일"))):
        return COLUMN_DATE
    return None


_UID_VALUE_RE = re.compile(r"^(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*)){2,}$")


def looks_like_uid(value) -> bool:
    """A DICOM UID shape: dotted decimal components without leading zeros, at least three
    (``2.25.<int>``), 10 to 64 characters."""
    text = str(value).strip()
    return 10 <= len(text) <= 64 and bool(_UID_VALUE_RE.match(text))
