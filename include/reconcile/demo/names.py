"""Built-in word lists for the demo generator: names, companies, places, job titles.

Mixed cultures on purpose (accents, apostrophes, particles), so the pipeline's email and name
handling meets the same text a real contact list holds. Only `generator.py` reads these.
"""

FIRST_NAMES = (
    # English-speaking
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William", "Elizabeth",
    "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
    "Christopher", "Nancy", "Daniel", "Lisa", "Matthew", "Betty", "Anthony", "Margaret", "Mark", "Sandra",
    "Steven", "Ashley", "Paul", "Emily", "Andrew", "Donna", "Joshua", "Michelle", "Kevin", "Carol",
    "Brian", "Amanda", "George", "Melissa", "Timothy", "Deborah", "Ronald", "Stephanie", "Jason", "Rebecca",
    "Ryan", "Laura", "Jacob", "Sharon", "Gary", "Cynthia", "Nicholas", "Kathleen", "Eric", "Amy",
    "Zoë", "Chloë", "Renée", "Noël", "Siobhán", "Niamh", "Aoife", "Seán", "Ciarán", "Eóin",
    # German, Nordic, Dutch
    "Jürgen", "Jörg", "Günther", "Uwe", "Anja", "Birgit", "Katrin", "Sören", "Björn", "Åsa",
    "Ingrid", "Lars", "Maja", "Sigrid", "Henrik", "Freja", "Mats", "Pernille", "Jan", "Femke",
    "Sanne", "Pieter", "Lieke", "Bram",
    # French, Italian, Spanish, Portuguese
    "José", "María", "Lucía", "Andrés", "Martín", "Sofía", "Javier", "Inés", "Raúl", "Begoña",
    "François", "Hélène", "Amélie", "Jérôme", "Céline", "Loïc", "Gaëlle", "Benoît", "Élodie", "Théo",
    "Giulia", "Francesco", "Chiara", "Lorenzo", "Niccolò", "Federica", "Matteo", "Alessia", "João", "Conceição",
    "Gonçalo", "Leonor",
    # Central and Eastern European
    "Katarzyna", "Małgorzata", "Paweł", "Łukasz", "Agnieszka", "Wojciech", "Zuzana", "Tomáš", "Jiří", "Markéta",
    "Dušan", "Ivana", "Mihai", "Ioana", "Ştefan", "Dmitri", "Olena", "Anastasia", "Bogdan", "Réka",
    "Zoltán", "Ágnes",
    # Turkish, Middle Eastern
    "Ayşe", "Mehmet", "Çağla", "Emre", "Gülşen", "Yusuf", "Fatima", "Omar", "Layla", "Karim",
    "Nour", "Hassan", "Yasmin", "Tariq",
    # South Asian
    "Priya", "Arjun", "Ananya", "Rohan", "Aditi", "Vikram", "Sneha", "Rahul", "Kavya", "Sanjay",
    "Meera", "Nikhil",
    # East and South-East Asian
    "Wei", "Mei", "Hiroshi", "Yuki", "Haruto", "Sakura", "Min-jun", "Ji-woo", "Seo-yeon", "Thanh",
    "Linh", "Minh", "Xin", "Jun", "Aiko", "Kenji",
    # African
    "Chinedu", "Ngozi", "Kwame", "Ama", "Oluwaseun", "Adaeze", "Thabo", "Zanele", "Kofi", "Amara",
    "Tendai", "Wanjiru",
)

LAST_NAMES = (
    # English-speaking
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Taylor",
    "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Hill", "Green", "Adams", "Baker",
    "Nelson", "Carter", "Mitchell", "Roberts", "Turner", "Phillips", "Campbell", "Parker", "Evans", "Edwards",
    "Collins", "Stewart", "Morris", "Rogers", "Reed", "Cook", "Morgan", "Bell", "Murphy", "Bailey",
    "O'Brien", "O'Connor", "O'Neill", "O'Sullivan", "McCarthy", "MacDonald", "McKenzie", "Fitzgerald", "Gallagher", "Kavanagh",
    # German, Nordic, Dutch
    "Müller", "Schmidt", "Schneider", "Fischer", "Weiß", "Schäfer", "Köhler", "Groß", "Hoffmann", "Krüger",
    "Bäcker", "Jäger", "Berg", "Lindqvist", "Åkesson", "Sørensen", "Jørgensen", "Nyström", "Öberg", "Halvorsen",
    "van der Berg", "de Vries", "van Dijk", "Bakker", "Janssen", "Visser",
    # French, Italian, Spanish, Portuguese
    "García", "Rodríguez", "Martínez", "Hernández", "López", "González", "Pérez", "Sánchez", "Ramírez", "Núñez",
    "Muñoz", "Jiménez", "Dubois", "Lefèvre", "Moreau", "Laurent", "Girard", "Bonnet", "Mercier", "Lemaître",
    "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci", "Conceição", "Gonçalves",
    "Magalhães", "Simões",
    # Central and Eastern European
    "Kowalski", "Nowak", "Wiśniewski", "Wójcik", "Kamińska", "Lewandowski", "Zieliński", "Szymańska", "Dvořák", "Novák",
    "Černý", "Procházka", "Horváth", "Nagy", "Szabó", "Tóth", "Popescu", "Ionescu", "Petrović", "Jovanović",
    "Kovačević", "Shevchenko", "Ivanova", "Kuznetsov",
    # Turkish, Middle Eastern
    "Yılmaz", "Kaya", "Demir", "Şahin", "Çelik", "Öztürk", "Haddad", "Khalil", "Nasser", "Farouk",
    "Mansour", "Abboud", "Rahman", "Aziz",
    # South Asian
    "Patel", "Sharma", "Singh", "Kumar", "Gupta", "Reddy", "Iyer", "Nair", "Menon", "Chatterjee",
    "Banerjee", "Desai", "Joshi", "Mehta",
    # East and South-East Asian
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Tanaka", "Suzuki",
    "Takahashi", "Watanabe", "Kim", "Lee", "Park", "Choi", "Nguyễn", "Trần", "Lê", "Phạm",
    # African
    "Okafor", "Adeyemi", "Mensah", "Boateng", "Nkosi", "Dlamini", "Okonkwo", "Mwangi", "Kamau", "Abiodun",
    "Diallo", "Traoré",
)

# (company name, email domain). Domains sit under example.com (RFC 2606), so no real mailbox is named.
COMPANIES = (
    ("Northwind Traders", "northwind-traders.example.com"),
    ("Brightwater Dental", "brightwater-dental.example.com"),
    ("Lumen Analytics", "lumen-analytics.example.com"),
    ("Vistula Logistics", "vistula-logistics.example.com"),
    ("Fjord Outfitters", "fjord-outfitters.example.com"),
    ("Contoso Pharmaceuticals", "contoso-pharma.example.com"),
    ("Fabrikam Manufacturing", "fabrikam.example.com"),
    ("Adventure Works Cycles", "adventure-works.example.com"),
    ("Tailspin Toys", "tailspin-toys.example.com"),
    ("Wide World Importers", "wideworld-importers.example.com"),
    ("Blue Yonder Airlines", "blue-yonder.example.com"),
    ("Coho Winery", "coho-winery.example.com"),
    ("Alpine Ski House", "alpine-ski-house.example.com"),
    ("Margie's Travel", "margies-travel.example.com"),
    ("Proseware", "proseware.example.com"),
    ("Litware", "litware.example.com"),
    ("Trey Research", "trey-research.example.com"),
    ("Woodgrove Bank", "woodgrove-bank.example.com"),
    ("Graphic Design Institute", "graphic-design-institute.example.com"),
    ("Humongous Insurance", "humongous-insurance.example.com"),
    ("Lucerne Publishing", "lucerne-publishing.example.com"),
    ("Relecloud", "relecloud.example.com"),
    ("Southridge Video", "southridge-video.example.com"),
    ("Fourth Coffee", "fourth-coffee.example.com"),
    ("School of Fine Art", "fineart-school.example.com"),
    ("Consolidated Messenger", "consolidated-messenger.example.com"),
    ("Bellows College", "bellows-college.example.com"),
    ("Datum Corporation", "datum-corp.example.com"),
    ("Hôtel Belle Époque", "belle-epoque.example.com"),
    ("Müller & Söhne Maschinenbau", "mueller-soehne.example.com"),
    ("Café Olé Roasters", "cafe-ole.example.com"),
    ("Øresund Shipping", "oresund-shipping.example.com"),
    ("Björk Interiör", "bjork-interior.example.com"),
    ("Naranja Energía", "naranja-energia.example.com"),
    ("Sakura Robotics", "sakura-robotics.example.com"),
    ("Lagos Fintech Hub", "lagos-fintech.example.com"),
    ("Kilimanjaro Coffee Co.", "kilimanjaro-coffee.example.com"),
    ("Ganges Software Services", "ganges-software.example.com"),
    ("Bosphorus Textiles", "bosphorus-textiles.example.com"),
    ("Tatra Engineering", "tatra-engineering.example.com"),
    ("Danube Solar", "danube-solar.example.com"),
    ("Mekong Foods", "mekong-foods.example.com"),
    ("Cedar Grove Clinics", "cedar-grove-clinics.example.com"),
    ("O'Malley Brewing", "omalley-brewing.example.com"),
    ("Red Rock Construction", "red-rock-construction.example.com"),
    ("Silver Lake Legal", "silver-lake-legal.example.com"),
    ("Harbor Freight Lines", "harbor-freight-lines.example.com"),
    ("Summit Outdoor Gear", "summit-outdoor.example.com"),
    ("Pacific Crest Realty", "pacific-crest-realty.example.com"),
    ("Evergreen Nurseries", "evergreen-nurseries.example.com"),
)

# Personal mailboxes (reserved example domains).
PERSONAL_DOMAINS = ("example.com", "example.org", "example.net")

JOB_TITLES = (
    "Owner", "CEO", "CFO", "Finance Manager", "Accounts Payable Clerk", "Purchasing Manager", "Buyer",
    "Operations Manager", "Office Manager", "IT Director", "Systems Administrator", "Marketing Manager",
    "Head of Sales", "Sales Representative", "Project Manager", "Practice Manager", "Procurement Lead",
    "Facilities Manager", "HR Generalist", "Logistics Coordinator",
)

# (city, state or county, postcode prefix, area codes) for US billing addresses and phones.
US_CITIES = (
    ("San Francisco", "CA", "941", ("415", "628")),
    ("New York", "NY", "100", ("212", "646", "917")),
    ("Chicago", "IL", "606", ("312", "773")),
    ("Boston", "MA", "021", ("617", "857")),
    ("Seattle", "WA", "981", ("206",)),
    ("Denver", "CO", "802", ("303", "720")),
    ("Austin", "TX", "787", ("512", "737")),
    ("Atlanta", "GA", "303", ("404", "470")),
    ("Portland", "OR", "972", ("503", "971")),
    ("Minneapolis", "MN", "554", ("612",)),
    ("Philadelphia", "PA", "191", ("215", "267")),
    ("San Diego", "CA", "921", ("619", "858")),
)

# (city, postcode, phone prefix in international form) for the few UK customers.
UK_CITIES = (
    ("London", "EC1A 1BB", "20 7946"),
    ("Manchester", "M1 1AE", "161 496"),
    ("Bristol", "BS1 4DJ", "117 496"),
)

STREETS = (
    "Main Street", "Oak Avenue", "Maple Drive", "Cedar Lane", "Harbor Way", "Market Street", "Mission Street",
    "Elm Street", "Park Avenue", "Lake Shore Drive", "Hillside Road", "Mill Road", "Station Road", "High Street",
    "Church Lane", "Riverside Drive", "Pine Street", "Washington Avenue", "Sunset Boulevard", "Broadway",
)

# Nicknames people give a web form or a sales rep instead of their full first name (hard case: the
# identity model must link "Bill Turner" to "William Turner" on the other evidence).
NICKNAMES = {
    "William": "Bill", "Robert": "Bob", "Richard": "Rick", "James": "Jim", "Michael": "Mike", "Elizabeth": "Liz",
    "Margaret": "Peggy", "Joseph": "Joe", "Thomas": "Tom", "Daniel": "Dan", "Christopher": "Chris",
    "Matthew": "Matt", "Anthony": "Tony", "Jennifer": "Jen", "Patricia": "Pat", "Jessica": "Jess",
    "Nicholas": "Nick", "Katarzyna": "Kasia", "Francesco": "Franco", "Alessia": "Ale",
}

# Full names shared by many different people (hard case: a common name alone is no evidence of one person).
COMMON_NAMES = (("John", "Smith"), ("Maria", "Garcia"), ("James", "Johnson"), ("Mary", "Brown"),
                ("Wei", "Wang"), ("David", "Miller"))

# --- the long tail of a large population -----------------------------------------------------------
# A real contact list of a million people holds tens of thousands of surnames and companies, not a
# few hundred. From 5,000 people on, the generator adds invented names built from these parts (a pool
# that grows with the population, see generator._Pools), so a full name and a company together mostly
# name one person, as they do in real data; the lists above stay the common head.

SURNAME_PARTS = (
    ("Al", "Ash", "Bar", "Bel", "Ber", "Bran", "Brook", "Cal", "Car", "Cor", "Dal", "Dar", "Del", "Dun",
     "El", "Fal", "Far", "Fen", "Gal", "Gar", "Gold", "Hal", "Har", "Hol", "Kel", "Ken", "Kir", "Lan",
     "Lar", "Lin", "Mal", "Mar", "Mor", "Nor", "Os", "Pen", "Ral", "Ran", "Ros", "Sal", "Sel", "Tal",
     "Tor", "Val", "Ver", "Wal", "Wil", "Yar", "Zel", "Ad", "Bor", "Cas", "Dor", "Est", "Fin", "Gor",
     "Hen", "Ing", "Jor", "Kas", "Lom", "Mer", "Nev", "Ol", "Pol", "Quin", "Rad", "Sten", "Tam", "Ul",
     "Vik", "Wes", "Zan", "Bal", "Cran", "Drum", "Eck", "Frey", "Grim", "Hart"),
    ("", "a", "e", "i", "o", "an", "en", "in", "or", "er", "ett", "und"),
    ("by", "ford", "ton", "ley", "wood", "man", "son", "sen", "berg", "stein", "ski", "ova", "ez", "ini",
     "elli", "ard", "ier", "ani", "oglu", "ian", "aki", "ura", "ek", "ic", "ens", "worth", "ham", "well",
     "more", "dale", "field", "hurst", "quist", "strom", "mann", "feld", "ovic", "escu", "enko", "idis",
     "opoulos", "ero", "az", "eau", "ot", "in", "ac", "ay", "ow", "ing", "er", "ell", "ick", "ock", "mond",
     "ins", "ers", "low", "sky", "wick"),
)

FIRST_NAME_PARTS = (
    ("Ma", "Li", "Ka", "Da", "Ra", "Sa", "Ta", "Na", "Ja", "Ela", "Ari", "Eli", "Ori", "Ila", "Mi", "Zo",
     "Le", "No", "Ro", "Ti", "Be", "Ce", "Fe", "Ga", "Ha", "Ke", "Lu", "Me", "Ne", "Pa"),
    ("", "ri", "la", "na", "vi", "le", "ro", "di", "se", "mo", "ta", "ly", "be", "no", "sha", "ki", "ra",
     "lo", "ne", "ve"),
    ("n", "a", "o", "e", "el", "an", "ia", "is", "us", "ah", "en", "ya"),
)

COMPANY_PARTS = (
    ("Amber", "Atlas", "Beacon", "Birch", "Bluebird", "Bridge", "Canyon", "Cardinal", "Cascade", "Cedar",
     "Clear", "Cobalt", "Copper", "Coral", "Crescent", "Crown", "Delta", "Eagle", "Echo", "Elm", "Ember",
     "Falcon", "Fern", "Flint", "Forge", "Gateway", "Glacier", "Granite", "Harbor", "Hawk", "Heron",
     "Highland", "Horizon", "Iron", "Ivy", "Juniper", "Keystone", "Lakeside", "Lantern", "Laurel",
     "Liberty", "Lighthouse", "Maple", "Meadow", "Meridian", "Mesa", "Mission", "North", "Oak", "Ocean",
     "Orchard", "Pacific", "Pine", "Pioneer", "Prairie", "Quarry", "Raven", "Redwood", "Ridge", "River",
     "Rock", "Sage", "Sandstone", "Sapphire", "Sequoia", "Sierra", "Silver", "Sparrow", "Spruce", "Star",
     "Sterling", "Stone", "Summit", "Sun", "Terra", "Timber", "Trident", "Union", "Valley", "Willow"),
    ("", "Bay", "Brook", "Creek", "Field", "Gate", "Hill", "Lake", "Park", "Point", "Peak", "Springs",
     "View", "Way", "Works"),
    ("Accounting", "Analytics", "Architects", "Bakery", "Builders", "Capital", "Clinic", "Consulting",
     "Dental", "Design", "Electric", "Energy", "Engineering", "Farms", "Foods", "Freight", "Health",
     "Insurance", "Labs", "Legal", "Logistics", "Machining", "Media", "Medical", "Motors", "Partners",
     "Pharmacy", "Plumbing", "Printing", "Properties", "Realty", "Robotics", "Roofing", "Software",
     "Supply", "Systems", "Textiles", "Tools", "Travel", "Ventures"),
)
