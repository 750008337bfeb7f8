fn main() {
    println!("beltad");
}
