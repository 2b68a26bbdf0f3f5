"""Word pools for the synthetic org generator: names, places, titles, companies.

Each person name is ``(display, email token)``: the token is the ASCII spelling used in email
addresses, so "Zoë" writes as ``zoe`` and "O'Brien" as ``obrien``.
"""

from __future__ import annotations

from typing import Callable

Pool = tuple[tuple[str, str], ...]


def _ascii(*words: str) -> Pool:
    return tuple((w, w.lower().replace("'", "").replace(" ", "")) for w in words)


FIRST: Pool = _ascii(
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William", "Elizabeth",
    "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Christopher", "Nancy", "Daniel", "Lisa", "Matthew", "Betty", "Anthony", "Margaret", "Mark", "Sandra",
    "Donald", "Ashley", "Steven", "Kimberly", "Paul", "Emily", "Andrew", "Donna", "Joshua", "Michelle",
    "Kenneth", "Carol", "Kevin", "Amanda", "Brian", "Melissa", "George", "Deborah", "Timothy", "Stephanie",
    "Ronald", "Rebecca", "Jason", "Laura", "Ryan", "Sharon", "Jacob", "Cynthia", "Gary", "Kathleen",
    "Nicholas", "Amy", "Eric", "Angela", "Jonathan", "Shirley", "Stephen", "Anna", "Larry", "Brenda",
    "Justin", "Pamela", "Scott", "Emma", "Brandon", "Nicole", "Benjamin", "Helen", "Samuel", "Samantha",
    "Priya", "Raj", "Wei", "Mei", "Hiroshi", "Yuki", "Ahmed", "Fatima", "Olga", "Ivan", "Lars", "Ingrid",
    "Pierre", "Camille", "Luca", "Giulia", "Diego", "Lucia", "Kwame", "Amara",
)
LAST: Pool = _ascii(
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
    "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Gomez",
    "Phillips", "Evans", "Turner", "Diaz", "Parker", "Cruz", "Edwards", "Collins", "Reyes", "Stewart",
    "Morris", "Morales", "Murphy", "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson",
    "Bailey", "Reed", "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson", "Brooks",
    "Patel", "Shah", "Chen", "Wang", "Tanaka", "Sato", "Khan", "Ivanov", "Larsen", "Dubois", "Rossi",
    "O'Brien", "D'Angelo", "O'Neil", "Van der Berg", "McDonald", "MacLeod", "Smith-Jones",
)
# A handful of non-ASCII names; picked for about 1.5% of people.
FIRST_INTL: Pool = (("Zoë", "zoe"), ("Łukasz", "lukasz"), ("محمد", "mohammed"), ("José", "jose"),
                    ("François", "francois"), ("Søren", "soren"), ("Jürgen", "jurgen"), ("Chloé", "chloe"),
                    ("Małgorzata", "malgorzata"), ("Renée", "renee"), ("Björn", "bjorn"), ("美咲", "misaki"))
LAST_INTL: Pool = (("Müller", "muller"), ("Ødegaard", "odegaard"), ("García", "garcia"), ("Çelik", "celik"),
                   ("Dvořák", "dvorak"), ("Wójcik", "wojcik"), ("Núñez", "nunez"), ("Håkansson", "hakansson"),
                   ("Fernández", "fernandez"), ("Kovačević", "kovacevic"), ("العلي", "alali"), ("山田", "yamada"))
INTL_SHARE = 0.015


def pick(rnd: Callable[[], float], pool: Pool, intl: Pool) -> tuple[str, str]:
    source = intl if rnd() < INTL_SHARE else pool
    return source[int(rnd() * len(source))]


def capitalise_email(address: str) -> str:
    """``john.smith@acme.com`` -> ``John.Smith@Acme.com``: the way people type their own address."""
    local, _, domain = address.partition("@")
    return ".".join(p[:1].upper() + p[1:] for p in local.split(".")) + "@" + domain[:1].upper() + domain[1:]


SALUTATIONS = ("Mr.", "Ms.", "Mrs.", "Dr.", "Prof.")
TITLES = ("Marketing Manager", "VP Sales", "Chief Executive Officer", "CTO", "IT Director", "Buyer",
          "Procurement Lead", "Operations Manager", "Software Engineer", "Data Analyst", "CFO",
          "Account Executive", "Head of Growth", "Product Manager", "Office Manager", "Consultant",
          "Director of Marketing", "Sales Representative", "HR Business Partner", "Facilities Manager")
INTERESTS = ("CRM rollout", "Analytics add-on", "Enterprise licences", "Support renewal", "Cloud migration",
             "Onboarding package", "Security review", "Field service", "Training seats", "API access")
DESCRIPTIONS = ("Met at the spring trade show; follow up after Q2 budget.", "Prefers email, no calls before 10am.",
                "Existing customer of our partner; warm introduction.", "Asked for a pricing sheet and a demo.",
                "Key account: escalate issues to the regional lead.", "Duplicate suspected, check with sales ops.")
PROJECT_WORDS = ("Phoenix", "Atlas", "Orion", "Nova", "Horizon", "Apollo", "Zephyr", "Summit", "Beacon", "Vertex")

_COMPANY_A = ("Blue", "Red", "North", "South", "Silver", "Golden", "Bright", "Green", "Iron", "Pacific",
              "Atlantic", "Summit", "River", "Stone", "Eagle", "Maple", "Cedar", "Oak", "Pine", "Lake",
              "Prime", "United", "Global", "First", "Metro", "Apex", "Crest", "Harbor", "Valley", "Sun")
_COMPANY_B = ("Ridge", "Logistics", "Systems", "Foods", "Health", "Energy", "Analytics", "Retail", "Motors",
              "Labs", "Capital", "Software", "Dynamics", "Media", "Works", "Partners", "Solutions", "Supply",
              "Networks", "Design", "Consulting", "Pharma", "Textiles", "Robotics", "Studios", "Builders")
_COMPANY_SUFFIX = ("Inc.", "LLC", "Ltd", "GmbH", "Group", "Corp.", "& Co.", "S.A.", "", "", "", "")


def company(rnd: Callable[[], float]) -> tuple[str, str]:
    """(company name, domain slug)."""
    a = _COMPANY_A[int(rnd() * len(_COMPANY_A))]
    b = _COMPANY_B[int(rnd() * len(_COMPANY_B))]
    suffix = _COMPANY_SUFFIX[int(rnd() * len(_COMPANY_SUFFIX))]
    return (f"{a} {b} {suffix}" if suffix else f"{a} {b}"), f"{a}{b}".lower()


LEAD_TLDS = ("net", "io", "co", "biz")  # account domains use .com/.org, so lead and contact emails never collide
FREEMAIL = ("gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com")
INDIVIDUAL = "Individual customer"
ORG_NAME = "sandbox-org"
ORG_DOMAIN = "sandbox-org.onmicrosoft.com"
REGIONS = ("EMEA", "Americas", "APAC", "Nordics", "DACH", "Benelux", "Iberia", "ANZ", "LATAM", "UK&I")
FUNCTIONS = ("Sales", "Inside Sales", "Marketing", "Customer Success", "Partners", "Enterprise", "SMB",
             "Public Sector", "Channel", "Renewals")

AREA_CODES = ("212", "415", "312", "617", "206", "512", "303", "404", "305", "702", "646", "213")
PHONE_FORMATS = ("+1 {a}-555-{n:04d}", "({a}) 555-{n:04d}", "{a}.555.{n:04d}", "+1{a}555{n:04d}",
                 "{a}-555-{n:04d} x{a}")
STREETS = ("Main St", "Oak Avenue", "Market Street", "Elm Road", "Park Lane", "High Street", "Broadway",
           "Cedar Blvd", "Maple Drive", "Station Road", "Harbour Way", "Kings Road", "Rue de Rivoli",
           "Hauptstraße", "Calle Mayor")
PLACES = (  # (city, state/province, country, postal code)
    ("New York", "NY", "United States", "10001"), ("San Francisco", "CA", "United States", "94105"),
    ("Chicago", "IL", "United States", "60601"), ("Boston", "MA", "United States", "02110"),
    ("Seattle", "WA", "United States", "98101"), ("Austin", "TX", "United States", "73301"),
    ("Denver", "CO", "United States", "80202"), ("Atlanta", "GA", "United States", "30303"),
    ("Miami", "FL", "United States", "33101"), ("Toronto", "ON", "Canada", "M5H 2N2"),
    ("Vancouver", "BC", "Canada", "V6B 1A1"), ("London", "Greater London", "United Kingdom", "EC1A 1BB"),
    ("Manchester", "Greater Manchester", "United Kingdom", "M1 1AE"), ("Dublin", "Leinster", "Ireland", "D02 X285"),
    ("Paris", "Île-de-France", "France", "75001"), ("Berlin", "Berlin", "Germany", "10115"),
    ("München", "Bayern", "Germany", "80331"), ("Amsterdam", "Noord-Holland", "Netherlands", "1012 JS"),
    ("Madrid", "Madrid", "Spain", "28013"), ("Milano", "Lombardia", "Italy", "20121"),
    ("Stockholm", "Stockholm", "Sweden", "111 20"), ("Kraków", "Małopolskie", "Poland", "31-001"),
    ("Sydney", "NSW", "Australia", "2000"), ("Melbourne", "VIC", "Australia", "3000"),
    ("Tokyo", "Tokyo", "Japan", "100-0001"), ("Singapore", "", "Singapore", "018956"),
    ("Bengaluru", "Karnataka", "India", "560001"), ("São Paulo", "SP", "Brazil", "01000-000"),
    ("Mexico City", "CDMX", "Mexico", "06000"), ("Dubai", "Dubai", "United Arab Emirates", "00000"),
)
# Labels of the Dynamics lead "Lead Source" option set (sandbox schema LEAD_SOURCE), so that persons that
# become leads ("Sync Person to Microsoft") carry a source Dynamics can store: a generated org starts with no
# held record (issue 9). Unmappable labels are made on purpose by the bad-input tests.
MARKETO_SOURCES = ("Web", "Seminar", "Trade Show", "Advertisement", "Partner", "Word of Mouth",
                   "Employee Referral", "Other")
MARKETO_STATUSES = ("New", "Engaged", "Nurture", "MQL", "Recycled")
# Marketo-born companies and opportunities (free text in Marketo, so not Dynamics option labels).
MARKETO_INDUSTRIES = ("Software", "Manufacturing", "Healthcare", "Retail", "Financial Services", "Education",
                      "Logistics", "Energy", "Media", "Consulting")
OPPORTUNITY_STAGES = (  # (stage, probability, isClosed, isWon)
    ("Prospecting", 10, False, False), ("Qualification", 20, False, False), ("Proposal", 50, False, False),
    ("Negotiation", 75, False, False), ("Closed Won", 100, True, True), ("Closed Lost", 0, True, False))
# Role names a marketer or another integration uses; never the sync's own "Potential Customer".
OPPORTUNITY_ROLES = ("Decision Maker", "Influencer", "Technical Buyer", "Champion", "Economic Buyer")
